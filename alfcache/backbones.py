"""Load a ViT backbone (timm hub id, any timm id, or a local timm folder) behind one small interface."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AlfError
from .registry import MODELS, lookup
from .taps import TIMM_LAYOUT, Layout

log = logging.getLogger(__name__)


@dataclass
class Backbone:
    """A loaded model plus everything a store must record about it, the same for timm and transformers."""

    name: str  # short name, timm:<id>, hf:<id>, or local-<folder name> for a local folder (path in source_id)
    source_id: str  # timm id, local-dir:<abs path>, or hf:<id or abs path>
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


def _timm_backbone(name: str, source_id: str, model: torch.nn.Module, data_config: dict) -> Backbone:
    import timm.data

    return Backbone(name=name, source_id=source_id, model=model, data_config=data_config, library="timm",
                    layout=TIMM_LAYOUT, transform_fn=timm.data.create_transform(**data_config, is_training=False),
                    depth=len(model.blocks), width=int(model.embed_dim),
                    num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)),
                    num_registers=int(getattr(model, "num_reg_tokens", 0)),
                    num_patches=int(model.patch_embed.num_patches))


def _is_local(name: str) -> Path | None:
    if name.startswith("local-dir:"):
        return Path(name[len("local-dir:"):])
    p = Path(name)
    if (p / "config.json").is_file():
        return p
    return None


def describe(name: str) -> dict:
    """Architecture facts for the `alf models` table, without fetching weights (meta device)."""
    import timm

    entry = lookup(name)
    with torch.device("meta"):
        model = timm.create_model(entry.source_id, pretrained=False, **entry.create_kwargs)
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    return {
        "name": entry.name,
        "source_id": entry.source_id,
        "blocks": len(model.blocks),
        "width": int(model.embed_dim),
        "tokens": n_prefix + int(model.patch_embed.num_patches),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
    }


def load_backbone(name: str) -> Backbone:
    """Load by short name, `timm:<id>`, `hf:<transformers id or folder>`, `local-dir:<path>` or a folder path.

    Hub ids go through timm's own pretrained loading (Hugging Face hub); when the
    weights cannot be fetched the error is one line that names the model.
    """
    import timm
    import timm.data

    if name.startswith("hf:"):
        from .hf_backbones import load_hf_backbone

        return load_hf_backbone(name)
    local = _is_local(name)
    overrides: dict = {}
    create_kwargs: dict = {}
    if local is not None:
        if not (local / "config.json").is_file():
            raise AlfError(f"model folder '{local}' has no config.json (expected timm's save_for_hf layout)")
        source_id = f"local-dir:{local.resolve()}"
    elif name.startswith("timm:"):
        source_id = name[len("timm:"):]
        if source_id.split(".")[0] not in timm.list_models():
            raise AlfError(f"unknown timm model '{source_id}' (see timm.list_models())")
    else:
        entry = lookup(name)
        source_id, create_kwargs, overrides = entry.source_id, entry.create_kwargs, entry.data_overrides
    try:
        model = timm.create_model(source_id, pretrained=True, **create_kwargs)
    except AlfError:
        raise
    except Exception as e:  # network, hub, missing file: all the same to the user
        where = "from the Hugging Face hub" if local is None else f"from '{local}'"
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise AlfError(f"could not fetch weights for model '{name}' ({source_id}) {where}: {reason}") from None
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise AlfError(f"model '{name}' is not a timm VisionTransformer-like model (no blocks/patch_embed)")
    model.eval()
    data_config = timm.data.resolve_data_config(args=dict(overrides), model=model)
    display = f"local-{local.resolve().name}" if local is not None else name
    return _timm_backbone(display, source_id, model, data_config)


def build_random_model(path: str | os.PathLike, arch: str = "vit_tiny_patch16_224", *, img_size: int = 32,
                       patch_size: int = 4, embed_dim: int = 64, depth: int = 6, num_heads: int = 4,
                       seed: int = 0, **kwargs) -> Path:
    """Create a small timm ViT with RANDOM weights and save it in timm's own folder layout.

    It exercises the whole pipeline offline; its features carry no pretrained knowledge.
    """
    import timm

    torch.manual_seed(seed)
    overlay = {"input_size": (3, img_size, img_size), "crop_pct": 1.0, "interpolation": "bicubic",
               "num_classes": 0}
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


__all__ = ["Backbone", "MODELS", "build_random_model", "describe", "load_backbone"]
