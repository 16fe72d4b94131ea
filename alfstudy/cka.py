"""Centered kernel alignment between two representations of the same examples.

Debiased (unbiased-HSIC) CKA, as the paper uses: Song et al. 2012's unbiased HSIC estimator,
Nguyen et al. / Kornblith et al.'s CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).
Kernels: linear (default) or RBF with bandwidth = `sigma` x median pairwise distance.
"""
from __future__ import annotations

import numpy as np
import torch


def _gram_linear(x: torch.Tensor) -> torch.Tensor:
    return x @ x.T


def _gram_rbf(x: torch.Tensor, sigma: float) -> torch.Tensor:
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)
    med = d2[~torch.eye(len(x), dtype=torch.bool, device=x.device)].median().sqrt()
    bw = sigma * med
    return torch.exp(-d2 / (2 * bw * bw))


def hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    n = K.shape[0]
    if n < 4:
        raise ValueError("debiased HSIC needs at least 4 examples")
    K = K.clone().fill_diagonal_(0)
    L = L.clone().fill_diagonal_(0)
    KL = K @ L
    ones_K, ones_L = K.sum(), L.sum()
    return (KL.trace() + ones_K * ones_L / ((n - 1) * (n - 2)) - 2 * KL.sum() / (n - 2)) / (n * (n - 3))


def cka(x, y, kernel: str = "linear", sigma: float = 0.8, debiased: bool = True, max_samples: int | None = 4000,
        seed: int = 0) -> float:
    """CKA of two (N, D1), (N, D2) representations of the same N examples (rows subsampled beyond max_samples)."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same examples: {x.shape[0]} vs {y.shape[0]} rows")
    if max_samples and x.shape[0] > max_samples:
        idx = torch.from_numpy(np.random.default_rng(seed).choice(x.shape[0], max_samples, replace=False))
        x, y = x[idx], y[idx]
    if kernel == "linear":
        K, L = _gram_linear(x), _gram_linear(y)
    elif kernel == "rbf":
        K, L = _gram_rbf(x, sigma), _gram_rbf(y, sigma)
    else:
        raise ValueError(f"unknown CKA kernel '{kernel}' (known: linear, rbf)")
    if debiased:
        hxy, hxx, hyy = hsic_unbiased(K, L), hsic_unbiased(K, K), hsic_unbiased(L, L)
    else:
        n = K.shape[0]
        H = torch.eye(n, dtype=K.dtype) - 1.0 / n
        Kc, Lc = H @ K @ H, H @ L @ H
        hxy, hxx, hyy = (Kc * Lc).sum(), (Kc * Kc).sum(), (Lc * Lc).sum()
    return float(hxy / torch.sqrt(hxx * hyy))
