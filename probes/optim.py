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
    """AdamW over parameters that all carry the grid axis G first, with a learning rate and a weight decay per
    configuration (lr, weight_decay: (G,)).

    The parameters are moved into one flat (G, P) buffer (each becomes a view of its columns) and their
    gradients into another, so an optimiser step and the per-configuration clipping are a dozen tensor
    operations whatever the number of parameters (per-parameter loops cost more than the arithmetic for small
    heads). A gradient assigned by hand (`p.grad = t`) is honoured: it is copied into the buffer. Run backward
    under `torch.autograd.enforce_grad_layout_policy(False)`: the views are not dense, and torch would otherwise
    warn that their gradients keep the parameters' strides (which is what is wanted here)."""

    def __init__(self, params, lr: torch.Tensor, weight_decay: torch.Tensor, betas=(0.9, 0.999), eps=1e-8):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.wd = lr.float(), weight_decay.float()
        self.betas, self.eps, self.t = betas, eps, 0
        G = len(self.lr)
        if any(p.shape[0] != G for p in self.params):
            raise ValueError(f"every parameter needs the grid axis G={G} first")
        with torch.no_grad():
            self.flat = torch.cat([p.detach().reshape(G, -1) for p in self.params], 1)
        self.grad = torch.zeros_like(self.flat)
        self.views, off = [], 0
        for p in self.params:
            n = p[0].numel()
            p.data = self.flat[:, off:off + n].view(p.shape)
            self.views.append(self.grad[:, off:off + n].view(p.shape))
            off += n
        self.m, self.v = torch.zeros_like(self.flat), torch.zeros_like(self.flat)

    def zero_grad(self) -> None:
        self.grad.zero_()
        for p, g in zip(self.params, self.views):
            p.grad = g  # backward accumulates into the buffer in place

    def gather_grads(self) -> None:
        """Make every parameter's .grad the view of its columns of the flat gradient buffer."""
        for p, g in zip(self.params, self.views):
            if p.grad is None:
                g.zero_()
            elif p.grad.data_ptr() != g.data_ptr() or p.grad.stride() != g.stride():
                g.copy_(p.grad)
                p.grad = g

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip each configuration's whole gradient to `max_norm` (as torch.nn.utils.clip_grad_norm_)."""
        with torch.no_grad():  # (not a decorator: the mutation tool skips decorated functions)
            self.gather_grads()
            norm = torch.linalg.vector_norm(self.grad, dim=1)
            coef = (max_norm / (norm + 1e-6)).clamp_(max=1.0)
            self.grad.mul_(coef.unsqueeze(1))
            return norm

    def step(self, lr: torch.Tensor) -> None:
        """One AdamW step of every configuration with its own learning rate (lr: (G,)) and weight decay: torch's
        fused AdamW kernel on each configuration's row (one pass over the memory). (A written-out fallback for
        a torch without that kernel was removed: the pinned torch has it on every device; mutation testing showed
        the fallback never ran.)"""
        with torch.no_grad():
            self.gather_grads()
            self.t += 1
            step = torch.tensor(float(self.t), device=self.flat.device)
            b1, b2 = self.betas
            for g, (rate, decay) in enumerate(zip(lr.float().tolist(), self.wd.tolist())):
                torch._fused_adamw_([self.flat[g]], [self.grad[g]], [self.m[g]], [self.v[g]], [], [step], lr=rate,
                                    beta1=b1, beta2=b2, weight_decay=decay, eps=self.eps, amsgrad=False,
                                    maximize=False)
