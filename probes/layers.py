"""Layers batched over a grid: every parameter has a leading axis G, one slice per configuration.

All G slices start from the same initialisation (drawn once from the seed, in the order torch's own modules draw
it), so a configuration trained inside a grid equals the same configuration trained alone. Logits are returned
as (G, B, C) views whose memory is class-major (G, C, B): the loss reduces over the few classes along long rows.
"""
from __future__ import annotations

import torch
from torch import nn


class _Rows(torch.autograd.Function):
    """param[start:stop] whose backward adds into those rows of param.grad in place, instead of building a
    gradient of the whole parameter (zeros elsewhere) and adding that: with a grid trained in groups, the
    standard slice costs a few passes over every configuration's weights per group."""

    @staticmethod
    def forward(ctx, param, start: int, stop: int):
        ctx.param, ctx.rows = param, (start, stop)
        return param[start:stop].view_as(param[start:stop])

    @staticmethod
    def backward(ctx, grad):
        p, (start, stop) = ctx.param, ctx.rows
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad[start:stop].add_(grad)
        return None, None, None


def rows(param: torch.Tensor, sl: slice) -> torch.Tensor:
    """The configurations `sl` (a step-1 slice) of a grid parameter (axis 0), for training one group of a grid."""
    start, stop, step = sl.indices(param.shape[0])
    if (start, stop, step) == (0, param.shape[0], 1):
        return param  # not param[:]: autograd would scatter its gradient into a zero-filled copy, then add that
    if not (param.requires_grad and torch.is_grad_enabled()):
        return param[sl]
    assert step == 1, "configuration groups are contiguous"
    return _Rows.apply(param, start, stop)


def replicate(t: torch.Tensor, G: int) -> nn.Parameter:
    return nn.Parameter(t.unsqueeze(0).repeat(G, *([1] * t.dim())).contiguous())


def linear_init(fan_in: int, fan_out: int, bias: bool = True):
    """torch.nn.Linear's default initialisation (same random draws), as (in, out) weight and (out,) bias."""
    lin = nn.Linear(fan_in, fan_out, bias=bias)
    return lin.weight.detach().t().contiguous(), (lin.bias.detach().clone() if bias else None)


class BatchedBatchNorm(nn.Module):
    """BatchNorm1d (affine, momentum 0.1, eps 1e-5) applied independently per configuration: x (G, B, F).

    The G configurations are laid side by side as G * F channels of one (B, G * F) batch, so torch's own
    batch-norm kernel (forward, backward and the running statistics, unbiased variance as BatchNorm1d) does the
    work in a few passes; reductions over the batch axis of a (G, B, F) tensor are slow on CPU."""

    def __init__(self, G: int, features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(G, features))
        self.bias = nn.Parameter(torch.zeros(G, features))
        self.register_buffer("running_mean", torch.zeros(G, features))
        self.register_buffer("running_var", torch.ones(G, features))

    def forward(self, x: torch.Tensor, sl: slice = slice(None)) -> torch.Tensor:
        g, B, F_ = x.shape
        flat = x.transpose(0, 1).reshape(B, g * F_)
        training = self.training and B > 1  # a batch of one sample has no statistics: use the running ones
        out = torch.nn.functional.batch_norm(flat, self.running_mean[sl].view(-1), self.running_var[sl].view(-1),
                                             rows(self.weight, sl).reshape(-1), rows(self.bias, sl).reshape(-1), training,
                                             self.momentum, self.eps)
        return out.view(B, g, F_).transpose(0, 1)


class BatchedLinear(nn.Module):
    """nn.Linear(F, C) per configuration: weight (G, F, C), bias (G, C)."""

    def __init__(self, G: int, features: int, num_classes: int):
        super().__init__()
        w, b = linear_init(features, num_classes)
        self.weight, self.bias = replicate(w, G), replicate(b, G)

    def forward(self, x: torch.Tensor, sl: slice = slice(None)) -> torch.Tensor:
        """x (g, B, F), one input per configuration -> class-major logits (g, B, C)."""
        W, b = rows(self.weight, sl), rows(self.bias, sl)
        return torch.baddbmm(b.unsqueeze(-1), W.transpose(1, 2), x.transpose(1, 2)).transpose(1, 2)

    def shared(self, x: torch.Tensor, sl: slice = slice(None)) -> torch.Tensor:
        """x (B, F) shared by every configuration: one matrix product for the whole grid -> (g, B, C)."""
        W = rows(self.weight, sl)
        g, F_, C = W.shape
        out = torch.addmm(rows(self.bias, sl).reshape(g * C, 1), W.permute(0, 2, 1).reshape(g * C, F_), x.t())
        return out.view(g, C, -1).transpose(1, 2)


class Classifier(nn.Module):
    """BatchNorm1d -> Linear, batched over G (the attention heads' classifier)."""

    def __init__(self, G: int, features: int, num_classes: int):
        super().__init__()
        self.bn = BatchedBatchNorm(G, features)
        self.linear = BatchedLinear(G, features, num_classes)

    def forward(self, x: torch.Tensor, sl: slice = slice(None)) -> torch.Tensor:
        return self.linear(self.bn(x, sl), sl)


def real_columns(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x (B, T, W) -> (B, len(valid)): the T tokens concatenated, without the zero padding of narrower tokens."""
    flat = x.reshape(x.shape[0], -1)
    return flat if len(valid) == flat.shape[1] else flat.index_select(1, valid)


class LinearHead(nn.Module):
    """The real (unpadded) columns of the T selected tokens, concatenated -> Linear (the authors' linear probes:
    a plain nn.Linear on the L2-normalised features, no BatchNorm)."""

    def __init__(self, G: int, valid: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("valid", valid.long().clone(), persistent=False)  # from the layout on load
        self.num_classes = num_classes
        self.linear = BatchedLinear(G, len(valid), num_classes)

    def forward(self, x: torch.Tensor, sl: slice = slice(None), draws=None) -> torch.Tensor:
        """x (B, T, W) shared by all configurations -> logits (g, B, C), one matrix product for the grid."""
        return self.linear.shared(real_columns(x, self.valid), sl)


class StandardisedLinearHead(nn.Module):
    """The real columns of the T selected tokens, concatenated -> BatchNorm1d -> Linear (the paper's prose for its
    linear probes; the authors' code has no BatchNorm). The BatchNorm makes the probe independent of the features'
    scale: L2-normalised tokens of a wide model have a per-dimension spread of ~0.01-0.04."""

    def __init__(self, G: int, valid: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("valid", valid.long().clone(), persistent=False)  # from the layout on load
        self.G, self.num_classes = G, num_classes
        self.classifier = Classifier(G, len(valid), num_classes)

    def forward(self, x: torch.Tensor, sl: slice = slice(None), draws=None) -> torch.Tensor:
        """x (B, T, W) shared by all configurations -> logits (g, B, C)."""
        flat = real_columns(x, self.valid)
        g = len(range(self.G)[sl])
        return self.classifier(flat.unsqueeze(0).expand(g, -1, -1), sl)


class PerTokenLinearHead(nn.Module):
    """Configuration g reads only token `token_index[g]` (its real columns) -> Linear (per-layer probes)."""

    def __init__(self, G: int, widths: list[int], width: int, num_classes: int, token_index: torch.Tensor):
        super().__init__()
        self.register_buffer("token_index", token_index.long().clone())
        mask = torch.zeros(len(widths), width)
        for t, w in enumerate(widths):
            mask[t, :w] = 1.0
        self.register_buffer("mask", mask)  # padded columns of a narrower token never reach its probe
        self.linear = BatchedLinear(G, width, num_classes)

    def forward(self, x: torch.Tensor, sl: slice = slice(None), draws=None) -> torch.Tensor:
        idx = self.token_index[sl]
        xt = x[:, idx].transpose(0, 1) * self.mask[idx].unsqueeze(1)  # (g, B, W)
        return self.linear(xt, sl)


def count_parameters(head: nn.Module, per_config: bool = True) -> int:
    """Trainable parameters of one configuration (every parameter carries the grid axis G first)."""
    params = list(head.parameters())
    if not per_config or not params:
        return sum(p.numel() for p in params)
    return sum(p[0].numel() for p in params)


__all__ = ["BatchedBatchNorm", "BatchedLinear", "Classifier", "LinearHead", "StandardisedLinearHead",
           "PerTokenLinearHead", "count_parameters", "linear_init", "replicate"]
