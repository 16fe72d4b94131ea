"""Training protocols: the hyper-parameter grid and every rule that decides how a probe is trained and chosen.

- `paper`: what the authors' code did for the published numbers (lciernik/attentive-layer-fusion; the evidence,
  file by file, is in docs/REPRODUCING.md): AdamW, cosine from the base lr to 1e-6 per step without warm-up,
  gradient-norm clip 5, class-weighted cross-entropy, Gaussian feature noise (std .05) on half of the training
  samples; lr {1e-1, 1e-2, 1e-3} x weight decay logspace(-6, 0, 7), x attention dropout {0, .1, .3} for
  attentive heads; a stratified 20% validation split of train, chosen by validation balanced accuracy (first
  best in the order dropout, lr, weight decay); the winner retrained on all of train. Batches: 2048 shrunk by
  the authors' rule until an epoch has at least 5 batches (`batch_size_for`); whole epochs, 40 or as many as
  reach 1000 steps. Validation features get the training noise (the authors validate on a subset of the noisy
  training dataset), and all-token features are normalised channel by channel across the tokens.
- `clean`: `paper` without its two accidents: clean validation features, every token normalised on its own.
- `quick`: a small grid for CPU runs (clean rules).
A dict overrides any field of a named protocol: {"base": "paper", "lr": [0.01], ...}.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields, replace

import numpy as np

from .errors import ProbeError, unknown_name


def authors_batch_size(batch: int, n: int, min_batches: int = 5) -> int:
    """The authors' batch-size rule (their `adjust_batch_size`): keep `batch` if an epoch of n samples has at least
    `min_batches` full batches and a final batch of 0 or at least half a batch; otherwise the largest size from
    n // k + 1 down to 17 that gives at least k full batches (k = max(min_batches, n // batch)) and such a final
    batch; 1 if none does."""
    if n < 1 or batch < 1:
        raise ProbeError(f"cannot form batches of {batch} from {n} samples")

    def final_ok(b: int) -> bool:
        rest = n % b
        return rest == 0 or rest >= 0.5 * b

    full = n // batch
    if full >= min_batches and final_ok(batch):
        return batch
    need = max(min_batches, full)
    for b in range(n // need + 1, 16, -1):
        if n // b >= need and final_ok(b):
            return b
    return 1


@dataclass(frozen=True)
class Protocol:
    name: str = "paper"
    lr: tuple = (1e-1, 1e-2, 1e-3)
    wd: tuple = tuple(float(w) for w in np.logspace(-6, 0, 7))
    dropout: tuple = (0.0, 0.1, 0.3)  # attention-weight dropout of attentive heads (no output dropout)
    epochs: int = 40
    min_steps: int = 1000
    batch_size: int = 2048
    min_batches: int = 5
    noise_std: float = 0.05
    noise_p: float = 0.5
    min_lr: float = 1e-6
    clip: float = 5.0
    val_fraction: float = 0.2
    val_noise: bool = True  # validation features get the training noise (paper) or are clean
    all_tokens_normalise: str = "across-tokens"  # how the all-tokens head's features are normalised

    def __post_init__(self):
        if not self.lr or not self.wd or not self.dropout:
            raise ProbeError(f"protocol '{self.name}': lr, wd and dropout need at least one value each")
        if any(not (0 <= d < 1) for d in self.dropout):
            raise ProbeError(f"protocol '{self.name}': dropout must be in [0, 1)")
        if any(v <= 0 for v in self.lr) or any(v < 0 for v in self.wd):
            raise ProbeError(f"protocol '{self.name}': learning rates must be > 0 and weight decays >= 0")
        if self.epochs < 1 or self.min_steps < 0 or self.batch_size < 1 or self.min_batches < 1:
            raise ProbeError(f"protocol '{self.name}': epochs and batch sizes must be at least 1")
        if not (0 < self.val_fraction < 1):
            raise ProbeError(f"protocol '{self.name}': val_fraction must be in (0, 1)")

    # -------------------------------------------------------------------------------- batches and steps
    def batch_size_for(self, n: int) -> int:
        """Batch size for training on all n training samples (the final retraining)."""
        return authors_batch_size(self.batch_size, n, self.min_batches)

    def tuning_batch_size(self, n_all: int, n_part: int) -> int:
        """Batch size while choosing: the full training set's, plus one when it would leave a final batch of a
        single sample (the authors' tuning loaders)."""
        b = self.batch_size_for(n_all)
        return b + 1 if n_part % b == 1 else b

    def epochs_for(self, n: int, batch: int) -> int:
        """Whole epochs: `epochs`, or as many as reach `min_steps`."""
        per_epoch = math.ceil(n / batch)
        return self.epochs if per_epoch * self.epochs >= self.min_steps else math.ceil(self.min_steps / per_epoch)

    def steps(self, n: int, batch: int) -> int:
        """Optimiser steps for n samples in batches of `batch` (every batch of every epoch, the last one partial)."""
        return self.epochs_for(n, batch) * math.ceil(n / batch)

    # -------------------------------------------------------------------------------- the grid
    def configs(self, with_dropout: bool) -> list[dict]:
        """The grid in the authors' selection order: dropout (separate runs), then lr, then weight decay."""
        drops = self.dropout if with_dropout else (0.0,)
        return [{"lr": float(lr), "wd": float(wd), "dropout": float(d)}
                for d, lr, wd in itertools.product(drops, self.lr, self.wd)]

    def describe(self) -> dict:
        return {f.name: (list(getattr(self, f.name)) if isinstance(getattr(self, f.name), tuple) else getattr(self, f.name))
                for f in fields(self)}


PROTOCOLS = {
    "paper": Protocol(),
    "clean": Protocol(name="clean", val_noise=False, all_tokens_normalise="token"),
    "quick": Protocol(name="quick", lr=(1e-1, 1e-2), wd=(1e-4, 1e-2), dropout=(0.0, 0.1), epochs=20, min_steps=300,
                      batch_size=256, val_noise=False, all_tokens_normalise="token"),
}


def resolve_protocol(protocol) -> Protocol:
    """A Protocol, a protocol name, or a dict of overrides ({"base": name, field: value, ...})."""
    if isinstance(protocol, Protocol):
        return protocol
    if isinstance(protocol, str):
        if protocol not in PROTOCOLS:
            raise unknown_name("protocol", protocol, PROTOCOLS)
        return PROTOCOLS[protocol]
    if isinstance(protocol, dict):
        base = resolve_protocol(protocol.get("base", "paper"))
        known = {f.name for f in fields(Protocol)}
        bad = sorted(set(protocol) - known - {"base"})
        if bad:
            raise ProbeError(f"unknown protocol field(s) {', '.join(bad)} (known: {', '.join(sorted(known))})")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in protocol.items() if k != "base"}
        return replace(base, **{"name": f"{base.name}+custom", **kw})
    raise ProbeError(f"protocol must be a name ({', '.join(PROTOCOLS)}), a dict or a Protocol, "
                     f"not {type(protocol).__name__}")
