"""Spreading a grid's configurations over torch.distributed ranks.

Under `torchrun --nproc-per-node K` (or any launcher that sets WORLD_SIZE), rank r trains configurations
r, r+K, r+2K, ... of the grid. Every rank draws the same batches, feature noise and dropout masks from the
seed and every configuration starts from the same initialisation, so a configuration's result does not
depend on which rank trained it. Validation scores are gathered on every rank, every rank picks the same
winner and retrains it (one configuration: cheap and deterministic), and only rank 0 writes files.
A single process is rank 0 of 1 and every call is a no-op.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as td


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def on(self) -> bool:
        return self.world > 1

    def share_of(self, n: int) -> list[int]:
        """Indices of the n configurations this rank trains."""
        return list(range(self.rank, n, self.world))

    def gather(self, part: dict) -> dict:
        """Union of every rank's dict (keys are disjoint), on every rank."""
        if not self.on:
            return dict(part)
        parts = [None] * self.world
        td.all_gather_object(parts, part)
        out: dict = {}
        for p in parts:
            out.update(p)
        return out


def current() -> Ranks:
    """The ranks of an initialised process group, else a single process."""
    if td.is_available() and td.is_initialized():
        return Ranks(td.get_rank(), td.get_world_size())
    return Ranks()


def init(device: str | None = None) -> tuple[Ranks, str | None]:
    """Join the process group a launcher describes (env:// variables); returns the ranks and the device
    this rank should use (cuda:LOCAL_RANK on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
        cuda = device in (None, "auto", "cuda") and torch.cuda.is_available()
        td.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
    return current(), device
