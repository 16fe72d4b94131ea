"""timm backbones (registry short names, `timm:<id>`, local timm folders), built once with their weights.

The weights file is found first (Hugging Face cache or hub, `weights.py`); the architecture is created on the
meta device (no random initialisation) and the checkpoint, after timm's own conversion, is assigned into it.
Preprocessing comes from timm's `resolve_data_config` / `create_transform`, with the registry's per-protocol
overrides.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from .backbone import Backbone
from .errors import AlfError
from .registry import MODELS, ModelEntry, hub_repo
from .sources import ModelSource
from .taps import TIMM_LAYOUT
from .weights import WEIGHT_FILES, hub_file, read_state_dict

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- family adjustments
def dinov2_hub_pos_embed(pos_embed: torch.Tensor, grid: int, offset: float = 0.1) -> torch.Tensor:
    """(1, 1 + M*M, D) position embeddings -> (1, 1 + grid*grid, D) exactly as DINOv2's torch.hub model computes
    them on every forward pass at grid*patch pixels: the patch grid resampled bicubically with the scale factor
    (grid + offset) / M (not a target size), no antialiasing, in float32; the CLS position unchanged.
    (timm instead resamples to the target size with antialiasing, which gives other values.)"""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    m, d = math.isqrt(patch_pos.shape[1]), patch_pos.shape[-1]
    if m * m != patch_pos.shape[1]:
        raise AlfError(f"DINOv2 position embeddings of {patch_pos.shape[1]} patches are not a square grid")
    if m == grid:
        return pos_embed
    scale = (grid + offset) / m
    out = torch.nn.functional.interpolate(patch_pos.float().reshape(1, m, m, d).permute(0, 3, 1, 2),
                                          scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if tuple(out.shape[-2:]) != (grid, grid):
        raise AlfError(f"DINOv2 position embeddings resampled to {tuple(out.shape[-2:])}, expected {grid}x{grid}")
    out = out.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos_embed.dtype)
    return torch.cat([cls_pos, out], dim=1)


# ----------------------------------------------------------------------------------------- timm loading
def _assign_weights(model: torch.nn.Module, state_dict: dict, what: str) -> torch.nn.Module:
    """Put a checkpoint into a model built on the meta device (timm's own checkpoint conversion first)."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if isinstance(model, VisionTransformer):
        state_dict = checkpoint_filter_fn(state_dict, model)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3])[:200] if len(first) > 1 else first[0][:200]
        raise AlfError(f"{what}: the weights do not fit the architecture ({detail})") from None
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise AlfError(f"{what}: the weights file leaves some parameters unset")
    return model.eval()


def _timm_model(timm_name: str, kwargs: dict, weights: Path, what: str, pos_embed: str | None = None):
    import timm

    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
    sd = read_state_dict(weights)
    if pos_embed == "dinov2-hub" and "pos_embed" in sd:
        sd["pos_embed"] = dinov2_hub_pos_embed(sd["pos_embed"], int(model.patch_embed.grid_size[0]))
    return _assign_weights(model, sd, what)


def _local_weights(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise AlfError(f"model folder '{folder}' holds no weights file ({', '.join(WEIGHT_FILES)})")


def _check_vit(model, name: str) -> None:
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise AlfError(f"model '{name}' is not a timm VisionTransformer-like model (no blocks/patch_embed)")


def load_timm_backbone(src: ModelSource, protocol: str) -> Backbone:
    import timm
    import timm.data

    entry: ModelEntry | None = MODELS.get(src.ident) if src.kind == "registry" else None
    overrides: dict = {}
    if entry is not None:
        what = f"model '{src.spec}' ({entry.timm_id})"
        weights = hub_file(hub_repo(entry), what=what, name=src.spec)
        kwargs = entry.architecture(protocol)
        model = _timm_model(entry.timm_id, kwargs, weights, what, entry.pos_embed)
        overrides, timm_name = entry.data_overrides(protocol), entry.timm_id
    elif src.kind == "timm":
        base = src.ident.split(".")[0]
        if not timm.is_model(base):
            raise AlfError(f"unknown timm model '{src.ident[:100]}' (see timm.list_models())")
        cfg = timm.models.get_pretrained_cfg(src.ident)
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not repo:
            raise AlfError(f"timm model '{src.ident}' has no pretrained weights on the Hugging Face hub; "
                           f"save them with timm.models.save_for_hf and pass local-dir:<folder>")
        what = f"model '{src.spec}' ({repo})"
        kwargs, timm_name = {}, src.ident
        model = _timm_model(src.ident, kwargs, hub_file(repo, what=what, name=src.spec), what)
    else:  # local-dir: timm's save_for_hf folder (config.json names the architecture and its arguments)
        folder = src.local
        what = f"model folder '{folder}'"
        kwargs, timm_name = {}, f"local-dir:{folder}"
        try:
            model = _timm_model(timm_name, kwargs, _local_weights(folder), what)
        except AlfError:
            raise
        except Exception as e:
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise AlfError(f"cannot build the model in '{folder}': {reason}") from None
    _check_vit(model, src.spec)
    data_config = timm.data.resolve_data_config(args=dict(overrides), model=model)
    projection = None
    if entry is not None and entry.projection:
        head = model.head
        projection = (head.weight.detach().float().numpy().copy(), head.bias.detach().float().numpy().copy())
    local = src.local
    return Backbone(name=src.name, source_id=src.source_id, model=model, data_config=data_config, library="timm",
                    layout=TIMM_LAYOUT, transform_fn=timm.data.create_transform(**data_config, is_training=False),
                    depth=len(model.blocks), width=int(model.embed_dim),
                    num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)),
                    num_registers=int(getattr(model, "num_reg_tokens", 0)),
                    num_patches=int(model.patch_embed.num_patches),
                    architecture={"timm_model": model.pretrained_cfg.get("architecture", timm_name), **kwargs},
                    protocol=protocol, projection=projection,
                    pretrained=not (local is not None and (local / "RANDOM_WEIGHTS.txt").exists()))
