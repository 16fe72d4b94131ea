"""AdamW and cosine schedule for parameters batched over a grid (leading axis G), each slice with its
own learning rate and weight decay; plus per-configuration gradient-norm clipping.

Per slice it is exactly torch.optim.AdamW (decoupled weight decay, bias correction); the lr follows
torch's CosineAnnealingLR closed form from the base lr down to `min_lr`, without warm-up.
"""
from __future__ import annotations

import math

import torch


def cosine_lr(base: torch.Tensor, step: int, total: int, min_lr: float) -> torch.Tensor:
    return min_lr + (base - min_lr) * (1 + math.cos(math.pi * step / max(total, 1))) / 2


class BatchedAdamW:
    def __init__(self, params, lr: torch.Tensor, weight_decay: torch.Tensor, betas=(0.9, 0.999), eps=1e-8):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.wd = lr.float(), weight_decay.float()
        self.betas, self.eps, self.t = betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip each configuration's whole gradient to `max_norm` (as torch.nn.utils.clip_grad_norm_)."""
        sq = None
        for p in self.params:
            if p.grad is None:
                continue
            s = p.grad.pow(2).reshape(p.shape[0], -1).sum(1)
            sq = s if sq is None else sq + s
        norm = sq.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(coef.view(-1, *([1] * (p.dim() - 1))))
        return norm

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            lr_g, wd_g = lr.view(shape), self.wd.view(shape)
            p.mul_(1 - lr_g * wd_g)
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v / bc2).sqrt_().add_(self.eps)
            p.sub_(lr_g * (m / bc1) / denom)
