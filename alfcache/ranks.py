"""Devices and torch.distributed ranks for extraction: which device a process uses, and the few collective steps
a distributed run needs (rank 0 decides, every rank follows). A single process is rank 0 of 1 and every call is
a no-op."""
from __future__ import annotations

import datetime
import os

import torch

from .errors import AlfError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AlfError("--device cuda was asked for but no CUDA device is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise AlfError(f"unknown device '{device}' (known: auto, cpu, cuda, cuda:N)")
    return torch.device(device)


class Dist:
    """The process group of a distributed extraction (torchrun, or any launcher that sets WORLD_SIZE)."""

    def __init__(self, enabled: bool, device: torch.device):
        import torch.distributed as td

        self.td = td
        self.on = enabled or int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.on and not td.is_initialized():
            td.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
        self.rank = td.get_rank() if self.on else 0
        self.world = td.get_world_size() if self.on else 1

    def device(self, device: torch.device) -> torch.device:
        """This rank's GPU when the job runs on CUDA."""
        if self.on and device.type == "cuda":
            return torch.device("cuda", self.rank % torch.cuda.device_count())
        return device

    def barrier(self):
        if self.on:
            self.td.barrier()

    def share(self, obj):
        """Rank 0's value of `obj` on every rank."""
        if not self.on:
            return obj
        box = [obj]
        self.td.broadcast_object_list(box, src=0)
        return box[0]
