"""The one interface every backbone is used through (timm and transformers alike): the model, its forward
pass, its preprocessing and everything a store records about it."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from .taps import TIMM_LAYOUT, Layout


@dataclass
class Backbone:
    """A loaded model plus everything a store must record about it, the same for timm and transformers."""

    name: str  # the name stores record: short name, timm:<id>, hf:<id>, local-<folder>
    source_id: str  # the resolved origin of the weights (timm id, local-dir:<abs path>, hf:<id or abs path>)
    model: torch.nn.Module
    data_config: dict  # preprocessing facts (timm data config, or the HF image processor's settings)
    library: str = "timm"  # timm | transformers
    layout: Layout = TIMM_LAYOUT
    transform_fn: object = None
    depth: int = 0
    width: int = 0
    num_prefix_tokens: int = 1
    num_registers: int = 0
    num_patches: int = 0
    architecture: dict = field(default_factory=dict)  # how the model was created (recorded; part of identity)
    protocol: str = "paper"
    projection: tuple[np.ndarray, np.ndarray] | None = None  # output projection (E, D) weight, (E,) bias
    pretrained: bool = True

    def transform(self):
        return self.transform_fn

    def forward(self, x: torch.Tensor):
        if self.library == "timm":
            return self.model.forward_features(x)
        return self.model(pixel_values=x)

    def fingerprint(self) -> str:
        """sha256 over the state dict (names, shapes, dtypes and bytes), independent of file layout."""
        h = hashlib.sha256()
        for key, t in sorted(self.model.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{key}|{tuple(t.shape)}|{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return "sha256:" + h.hexdigest()

    def preprocessing(self) -> dict:
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.data_config.items()}
        for k in ("mean", "std"):
            if k in cfg and cfg[k] is not None:
                cfg[k] = [float(m) for m in cfg[k]]
        cfg["transform"] = repr(self.transform_fn).replace("\n", " ")
        return cfg
