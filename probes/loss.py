"""Class-weighted cross-entropy per configuration, forward and backward written out for speed on CPU.

The class weights are the authors': n / (K * count_c) from the training labels (torch's CrossEntropyLoss with
`weight=` then takes the weighted mean, so any common factor cancels).
"""
from __future__ import annotations

import numpy as np
import torch


def class_weights(y: np.ndarray, num_classes: int) -> torch.Tensor:
    """n / (K * count) per class present in y, 0 for absent classes (K = classes present)."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(num_classes, dtype=np.float32)
    w[present] = len(y) / (present.sum() * counts[present])
    return torch.from_numpy(w)


EXP_FLOOR = -60.0  # exp(-60) ~ 9e-27: nothing next to the largest term (exp(0) = 1) in float32; its products
# with gradients stay clear of the denormal range, where CPU arithmetic is slow


class _WeightedCrossEntropy(torch.autograd.Function):
    """Class-weighted mean cross-entropy per configuration, forward and backward written out.

    Equals F.cross_entropy(logits[g], y, weight=weights) per slice to float32 rounding; forward + backward for a
    21-config grid of 862 samples on CPU: 1.7x faster than torch's logsumexp-based form, 6x once the probes are
    confident. It keeps the memory layout of the logits (the heads emit them class-major, so reductions over the
    classes run along long contiguous rows), needs no zero-filled scatter buffer in the backward pass, and avoids
    exp's slow path for underflowing arguments (30x slower; most are, once a probe is confident) by clamping
    x - max at EXP_FLOOR, which changes each such term and its gradient by < 1e-26."""

    @staticmethod
    def forward(ctx, logits, y, weights):
        g, B, C = logits.shape
        wb = weights[y]
        wb = wb / wb.sum()
        m = logits.amax(-1, keepdim=True)
        e = (logits - m).clamp_min_(EXP_FLOOR).exp_()
        s = e.sum(-1, keepdim=True)
        idx = y.view(1, B, 1).expand(g, B, 1)
        ce = (s.log() + m - logits.gather(-1, idx)).squeeze(-1)  # (g, B)
        ctx.save_for_backward(e.div_(s), idx, wb)
        return ce @ wb

    @staticmethod
    def backward(ctx, grad):
        p, idx, wb = ctx.saved_tensors
        coef = grad.view(-1, 1, 1) * wb.view(1, -1, 1)  # (g, B, 1)
        d = p * coef
        return d.scatter_add_(-1, idx, -coef), None, None


def weighted_cross_entropy(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Class-weighted mean cross-entropy per configuration: logits (G, B, C) -> (G,).
    Per slice it equals F.cross_entropy(logits[g], y, weight=weights)."""
    return _WeightedCrossEntropy.apply(logits, y, weights.to(logits.dtype))
