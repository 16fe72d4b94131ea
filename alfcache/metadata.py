"""The metadata an extraction writes into each store (the schema's keys are in format.py): what model and weights,
what preprocessing, which taps and token layout, what dataset (resolved identity) and split, labels, numerics."""
from __future__ import annotations

import platform
import time

import numpy as np

from . import __version__
from .backbone import Backbone
from .datasets import ImageSource, dataset_slug
from .format import FORMAT, PROJECTION, VERSION, array_checksum
from .images import RULES as IMAGE_RULES
from .taps import TapPlan


def library_versions() -> dict:
    import h5py
    import timm
    import torch
    import zarr

    return {"alfcache": __version__, "torch": torch.__version__, "timm": timm.__version__, "zarr": zarr.__version__,
            "h5py": h5py.__version__, "numpy": np.__version__, "python": platform.python_version()}


def token_layout(bb: Backbone, plan: TapPlan, shapes: dict) -> dict:
    """What every stored array holds, in words."""
    layout = {
        "cls": "(N, L, D): token 0 of each tapped layer",
        "ap": f"(N, L, D): mean over tokens {bb.num_prefix_tokens}: (patch tokens; CLS and "
              f"{bb.num_registers} register tokens excluded)",
        "layers": "L = len(taps.layer_names), in model order; the last is the final norm for tap sets alf/blocks/modules",
        "normalised": False,
    }
    if "patches" in shapes:
        layout["patches"] = "(N, P, D): every patch token of the last tapped layer (no CLS, no registers)"
    if "registers" in shapes:
        layout["registers"] = "(N, L, R, D): the register tokens of each tapped layer"
    if plan.module_kinds:
        layout["modules"] = ("modules/<kind>/{cls,ap,mean} (N, blocks, width of the module): token 0, patch mean, "
                             "mean over all tokens, for blocks 0..n-1")
    return layout


def projection_metadata(bb: Backbone) -> dict | None:
    if bb.projection is None:
        return None
    w, b = bb.projection
    return {"module": "head", "width": int(w.shape[0]), "arrays": list(PROJECTION),
            "meaning": "the model's own output for a final-layer token t (cls[:, -1], ap[:, -1], a patch token) is "
                       "t @ weight.T + bias (CLIP: visual.proj after ln_post); the stored tokens are not projected",
            "checksums": {PROJECTION[0]: array_checksum(w), PROJECTION[1]: array_checksum(b)}}


def projection_arrays(bb: Backbone) -> dict[str, np.ndarray] | None:
    """The store's non-per-sample arrays: the model's output projection, if it has one."""
    return None if bb.projection is None else dict(zip(PROJECTION, bb.projection))


def build_metadata(bb: Backbone, source: ImageSource, plan: TapPlan, *, dataset: str, shapes: dict, dtype: str,
                   chunk_rows: int, batch_size: int, fingerprint: str, extraction: dict) -> dict:
    """The whole metadata of one split's store. `extraction`: autocast, device type, numerics checks."""
    n = len(source)
    L, D = shapes["cls"]
    meta = {
        "format": FORMAT,
        "format_version": VERSION,
        "model": {"name": bb.name, "source_id": bb.source_id, "library": bb.library, "fingerprint": fingerprint,
                  "pretrained_weights": bb.pretrained, "architecture": bb.architecture,
                  "depth": bb.depth, "width": bb.width, "num_prefix_tokens": bb.num_prefix_tokens,
                  "num_registers": bb.num_registers, "num_patches": bb.num_patches,
                  "params": sum(p.numel() for p in bb.model.parameters())},
        "preprocessing": bb.preprocessing(),
        "taps": plan.describe(),
        "token_layout": token_layout(bb, plan, shapes),
        "arrays": {k: {"shape": [n, *v], "dtype": dtype} for k, v in sorted(shapes.items())},
        "dtype": dtype,
        "dataset": {"name": dataset, "slug": dataset_slug(dataset), **source.identity(),
                    "image_loading": {**IMAGE_RULES, "exif_orientation": "applied" if source.exif else
                                      "not applied (the authors' webdataset decoder ignores it)"}},
        "split": source.split,
        "class_names": list(source.class_names),
        "num_samples": n,
        "num_layers": L,
        "width": D,
        "chunk_rows": chunk_rows,
        "extraction": {"batch_size": batch_size, "protocol": bb.protocol, **extraction},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "library_versions": library_versions(),
        "complete": False,
    }
    proj = projection_metadata(bb)
    if proj is not None:
        meta["projection"] = proj
    return meta
