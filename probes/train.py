"""Training every configuration of a grid in one pass, and predicting with the result.

All configurations live in one batched module (leading axis G) and see the same batches, the same feature noise
and the same dropout draws; each has its own lr / weight decay / dropout and its own gradient clipping, so each
equals the same configuration trained alone. The rules (batch size, steps, noise, schedule) come from the
protocol (`protocol.py`).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from .batches import BatchStream
from .errors import ProbeError
from .heads import Head
from .loss import class_weights, weighted_cross_entropy
from .optim import BatchedAdamW, cosine_lr
from .protocol import Protocol
from .selection import TokenSpec

log = logging.getLogger(__name__)


_ALLOCATOR_SET = False


def keep_freed_memory() -> None:
    """Let this process keep the large blocks it frees (glibc: no mmap for them, no trimming), so a training step's
    temporaries reuse memory already touched. Otherwise every step's fresh tensors are page-faulted in again, which
    on some machines costs more than the arithmetic (a fresh 37 MB product: 32 ms vs 8 ms measured here). Peak
    memory is unchanged; memory is returned to the system when the process ends."""
    global _ALLOCATOR_SET
    if _ALLOCATOR_SET:
        return
    _ALLOCATOR_SET = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GB come from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of freed heap
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def add_noise(x: torch.Tensor, protocol: Protocol, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise (protocol.noise_std) on each whole sample with probability protocol.noise_p (the authors'
    GaussianNoise transform, applied to the stacked - and padded - tokens of a sample)."""
    if protocol.noise_std <= 0 or protocol.noise_p <= 0:
        return x
    hit = (torch.rand(x.shape[0], generator=gen) < protocol.noise_p).nonzero().squeeze(1)
    return x.index_add(0, hit, torch.randn((len(hit), *x.shape[1:]), generator=gen), alpha=protocol.noise_std)


def _group_size(head: Head, G: int, B: int, layout, budget: int = 1 << 30) -> int:
    """Configurations per forward/backward so the batched activations stay within `budget` bytes."""
    return max(1, min(G, budget // max(head.activation_bytes(B, layout), 1)))


def train_configs(fs, rows: np.ndarray, head: Head, tokens: TokenSpec, configs: list[dict], protocol: Protocol, *,
                  batch_size: int, seed: int, device: torch.device, progress: bool = True, desc: str = "",
                  in_memory: bool | None = None, group_size: int | None = None):
    """Train len(configs) heads in one pass over the same batches. Returns (module, steps)."""
    keep_freed_memory()
    C = len(fs.class_names)
    layout = fs.layout(tokens)
    G = len(configs)
    y_all = fs.labels[rows]
    if len(np.unique(y_all)) < 2:
        raise ProbeError("training data holds fewer than 2 classes")
    dropout = torch.tensor([c["dropout"] for c in configs])
    token_index = torch.tensor([c.get("token", 0) for c in configs])
    torch.manual_seed(seed)  # the authors seed torch right before building each probe
    module = head.build(G, layout, C, dropout, token_index).to(device)
    module.train()
    lr = torch.tensor([c["lr"] for c in configs], device=device)
    wd = torch.tensor([c["wd"] for c in configs], device=device)
    opt = BatchedAdamW(module.parameters(), lr, wd)
    weights = class_weights(y_all, C).to(device)
    steps = protocol.steps(len(rows), batch_size)
    stream = iter(BatchStream(fs, rows, tokens, batch_size, seed, in_memory=in_memory))
    gen = torch.Generator().manual_seed(seed + 1)
    gs = group_size or _group_size(head, G, batch_size, layout)
    groups = [slice(s, min(G, s + gs)) for s in range(0, G, gs)]
    for step in tqdm(range(steps), desc=desc or f"train {head.name} x{G}", disable=not progress, leave=False):
        xb, yb = next(stream)
        x = add_noise(torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32)), protocol, gen)
        draws = head.draws(x.shape[0], layout, gen)  # the same draws for every configuration, whatever its rate
        x, y = x.to(device), torch.from_numpy(yb).to(device)
        draws = draws.to(device) if draws is not None else None
        opt.zero_grad()
        for sl in groups:
            logits = module(x, sl, draws)  # (g, B, C)
            with torch.autograd.enforce_grad_layout_policy(False):  # gradients land in the optimiser's buffer
                weighted_cross_entropy(logits, y, weights).sum().backward()
        if hasattr(module, "zero_cancelled_grads"):
            opt.gather_grads()
            module.zero_cancelled_grads()
        opt.clip_grad_norm(protocol.clip)
        opt.step(cosine_lr(lr, step, steps, protocol.min_lr))
    module.eval()
    return module, steps


@torch.no_grad()
def predict_logits(module, fs, rows: np.ndarray, tokens: TokenSpec, device: torch.device, batch_size: int = 1024,
                   want_attention: bool = False, noise: tuple[Protocol, int] | None = None):
    """(G, N, C) logits for rows (in the given order); optionally (G, N, H, T) attention weights.
    `noise` = (protocol, seed): the features get the protocol's training noise first (validation as the authors
    ran it), drawn from the seed alone, so every configuration of a grid sees the same noisy features."""
    module.eval()
    outs, atts = [], []
    gen = torch.Generator().manual_seed(noise[1] + 2) if noise is not None else None
    for s in range(0, len(rows), batch_size):
        x = torch.from_numpy(fs.tokens(rows[s:s + batch_size], tokens))
        if noise is not None:
            x = add_noise(x, noise[0], gen)
        outs.append(module(x.to(device)).float().cpu())
        if want_attention and hasattr(module, "last_attention"):
            atts.append(module.last_attention().float().cpu().transpose(0, 1))
    logits = torch.cat(outs, dim=1).numpy()
    att = torch.cat(atts, dim=0).transpose(0, 1).numpy() if atts else None
    return logits, att
