"""Short names for the paper's backbones, mapped to real pretrained timm ids."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import unknown_name


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source_id: str  # timm hub id (architecture.pretrained_tag)
    family: str
    create_kwargs: dict = field(default_factory=dict)
    # The paper's preprocessing: resize 256 -> center crop 224 with the model's mean/std.
    data_overrides: dict = field(default_factory=lambda: {"input_size": (3, 224, 224), "crop_pct": 0.875})


_PAPER_224 = {"img_size": 224}

MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in [
        ModelEntry("vit-s", "vit_small_patch16_224.augreg_in21k_ft_in1k", "vit"),
        ModelEntry("vit-b", "vit_base_patch16_224.augreg_in21k_ft_in1k", "vit"),
        ModelEntry("vit-l", "vit_large_patch16_224.augreg_in21k_ft_in1k", "vit"),
        ModelEntry("dinov2-s", "vit_small_patch14_dinov2.lvd142m", "dinov2", _PAPER_224),
        ModelEntry("dinov2-b", "vit_base_patch14_dinov2.lvd142m", "dinov2", _PAPER_224),
        ModelEntry("dinov2-l", "vit_large_patch14_dinov2.lvd142m", "dinov2", _PAPER_224),
        ModelEntry("clip-b32", "vit_base_patch32_clip_224.openai", "clip"),
        ModelEntry("clip-b16", "vit_base_patch16_clip_224.openai", "clip"),
        ModelEntry("clip-l", "vit_large_patch14_clip_224.openai", "clip"),
        ModelEntry("mae-b", "vit_base_patch16_224.mae", "mae"),
        ModelEntry("mae-l", "vit_large_patch16_224.mae", "mae"),
    ]
}

PREFIXES = ("timm:", "local-dir:")


def lookup(name: str) -> ModelEntry:
    """Resolve a short name; raise a one-line error with suggestions otherwise."""
    if name in MODELS:
        return MODELS[name]
    raise unknown_name("model", name, MODELS, hint="or timm:<timm id>, local-dir:<path>, a model folder path")
