"""Load any backbone by name (registry short name, `timm:<id>`, `hf:<transformers id or folder>`,
`local-dir:<timm folder>` or a folder path), describe registry models, and build random stand-in models."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .backbone import Backbone
from .registry import MODELS, check_protocol
from .sources import parse_model


def load_backbone(name: str, protocol: str = "paper") -> Backbone:
    """Load by short name, `timm:<id>`, `hf:<transformers id or folder>`, `local-dir:<path>` or a folder path.

    `protocol` picks the registry's paper or clean architecture/preprocessing (registry models only). Weights
    are found first; when they cannot be had the error is one line naming the model, its hub id and the ways out.
    """
    check_protocol(protocol)
    src = parse_model(name)
    if src.kind == "hf":
        from .hf_backbones import load_hf_backbone

        return load_hf_backbone(src)
    from .timm_backbones import load_timm_backbone

    return load_timm_backbone(src, protocol)


def build_random_model(path: str | os.PathLike, arch: str = "vit_tiny_patch16_224", *, img_size: int = 32,
                       patch_size: int = 4, embed_dim: int = 64, depth: int = 6, num_heads: int = 4,
                       seed: int = 0, **kwargs) -> Path:
    """Create a small timm ViT with RANDOM weights and save it in timm's own folder layout.

    It exercises the whole pipeline offline; its features carry no pretrained knowledge.
    """
    import timm

    from .errors import AlfError, unknown_name

    if not timm.is_model(arch):
        raise unknown_name("timm architecture", arch, timm.list_models("vit_tiny*") + ["..."])
    if not _is_vit(arch):
        raise AlfError(f"--arch '{arch}' is not a timm VisionTransformer (try vit_tiny_patch16_224)")
    torch.manual_seed(seed)
    overlay = {"input_size": (3, img_size, img_size), "crop_pct": 1.0, "interpolation": "bicubic",
               "num_classes": 0, **kwargs.pop("pretrained_cfg_overlay", {})}  # preprocessing of a stand-in
    model = timm.create_model(arch, pretrained=False, img_size=img_size, patch_size=patch_size,
                              embed_dim=embed_dim, depth=depth, num_heads=num_heads, num_classes=0,
                              pretrained_cfg_overlay=overlay, **kwargs)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    timm.models.save_for_hf(model, str(path), model_args={"img_size": img_size, "patch_size": patch_size,
                                                          "embed_dim": embed_dim, "depth": depth,
                                                          "num_heads": num_heads, "num_classes": 0, **kwargs})
    (path / "RANDOM_WEIGHTS.txt").write_text("This model has random weights; it only exercises the pipeline.\n")
    return path


def _is_vit(arch: str) -> bool:
    """Does the timm architecture build a VisionTransformer (known from its entry point, without building it)?"""
    import timm

    fn = timm.models.model_entrypoint(arch)
    return fn.__module__ == "timm.models.vision_transformer"


__all__ = ["Backbone", "MODELS", "build_random_model", "load_backbone"]
