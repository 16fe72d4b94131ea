"""The paper's backbones by short name: weights, architecture and preprocessing per extraction protocol.

Two extraction protocols:
- `paper`: exactly what the authors' extraction did (lciernik/attentive-layer-fusion through thingsvision 2.7.2,
  open_clip 3.1.0, timm 1.0.17; docs/REPRODUCING.md has the file-and-line evidence for every field below):
  timm ViTs with timm's own pretrained preprocessing; DINOv2 and MAE with thingsvision's default transform
  (Resize 256 bilinear, CenterCrop 224, ImageNet mean/std); CLIP with open_clip's eval transform (Resize 224
  bicubic, CenterCrop 224) and - an accident of open_clip 3.x with the plain `ViT-B-16` names - nn.GELU instead
  of the QuickGELU the OpenAI weights were trained with; DINOv2's position embeddings interpolated from 37x37 to
  16x16 the way torch.hub's DINOv2 does it on every forward pass.
- `clean`: the same models as their own authors evaluate them: CLIP with QuickGELU, DINOv2 and MAE resized with
  bicubic interpolation (their official linear-probe transforms). Everything else as in `paper`.

Static facts (blocks, width, tokens, parameters) are stated here so that listing models builds nothing; a test
checks them against the models built on the meta device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import unknown_name

PROTOCOLS = ("paper", "clean")
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_RESIZE_256_CROP_224 = {"input_size": (3, 224, 224), "crop_pct": 0.875}  # Resize(256) -> CenterCrop(224)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    timm_id: str  # timm architecture.pretrained_tag; its weights live in the HF hub repo timm/<timm_id>
    family: str  # vit | dinov2 | clip | mae
    blocks: int
    width: int
    tokens: int  # per image at 224 px: CLS + patches
    params_m: float
    paper_name: str  # the authors' model key
    projection: int | None = None  # width of the model's output projection (CLIP's visual.proj), if any
    create_kwargs: dict = field(default_factory=dict)  # for every protocol
    protocol_kwargs: dict = field(default_factory=dict)  # protocol -> extra create kwargs
    data: dict = field(default_factory=dict)  # protocol -> timm data-config overrides ({} = the model's own)
    pos_embed: str | None = None  # "dinov2-hub": interpolate 37x37 -> 16x16 as torch.hub's DINOv2 does

    def architecture(self, protocol: str) -> dict:
        return {**self.create_kwargs, **self.protocol_kwargs.get(protocol, {})}

    def data_overrides(self, protocol: str) -> dict:
        return dict(self.data.get(protocol, {}))


def _vit(name, timm_id, blocks, width, params, paper_name):
    # thingsvision ignores resize/crop arguments for timm models and uses timm's pretrained config
    return ModelEntry(name, timm_id, "vit", blocks, width, 197, params, paper_name)


def _dinov2(name, timm_id, blocks, width, params, paper_name):
    bilinear = {**_RESIZE_256_CROP_224, "interpolation": "bilinear", **IMAGENET}
    bicubic = {**_RESIZE_256_CROP_224, "interpolation": "bicubic", **IMAGENET}
    return ModelEntry(name, timm_id, "dinov2", blocks, width, 257, params, paper_name,
                      create_kwargs={"img_size": 224}, data={"paper": bilinear, "clean": bicubic},
                      pos_embed="dinov2-hub")


def _clip(name, timm_id, blocks, width, tokens, params, projection, paper_name):
    resize_224 = {"input_size": (3, 224, 224), "crop_pct": 1.0, "interpolation": "bicubic"}  # open_clip's eval
    return ModelEntry(name, timm_id, "clip", blocks, width, tokens, params, paper_name, projection=projection,
                      protocol_kwargs={"paper": {"act_layer": "gelu"}, "clean": {"act_layer": "quick_gelu"}},
                      data={"paper": resize_224, "clean": resize_224})


def _mae(name, timm_id, blocks, width, params, paper_name):
    bilinear = {**_RESIZE_256_CROP_224, "interpolation": "bilinear", **IMAGENET}
    bicubic = {**_RESIZE_256_CROP_224, "interpolation": "bicubic", **IMAGENET}
    return ModelEntry(name, timm_id, "mae", blocks, width, 197, params, paper_name,
                      data={"paper": bilinear, "clean": bicubic})


MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in [
        _vit("vit-s", "vit_small_patch16_224.augreg_in21k_ft_in1k", 12, 384, 22.1, "vit_small_patch16_224"),
        _vit("vit-b", "vit_base_patch16_224.augreg2_in21k_ft_in1k", 12, 768, 86.6, "vit_base_patch16_224"),
        _vit("vit-l", "vit_large_patch16_224.augreg_in21k_ft_in1k", 24, 1024, 304.3, "vit_large_patch16_224"),
        _dinov2("dinov2-s", "vit_small_patch14_dinov2.lvd142m", 12, 384, 21.6, "dinov2-vit-small-p14"),
        _dinov2("dinov2-b", "vit_base_patch14_dinov2.lvd142m", 12, 768, 85.7, "dinov2-vit-base-p14"),
        _dinov2("dinov2-l", "vit_large_patch14_dinov2.lvd142m", 24, 1024, 303.2, "dinov2-vit-large-p14"),
        _clip("clip-b32", "vit_base_patch32_clip_224.openai", 12, 768, 50, 87.8, 512, "OpenCLIP_ViT-B-32_openai"),
        _clip("clip-b16", "vit_base_patch16_clip_224.openai", 12, 768, 197, 86.2, 512, "OpenCLIP_ViT-B-16_openai"),
        _clip("clip-l", "vit_large_patch14_clip_224.openai", 24, 1024, 257, 304.0, 768, "OpenCLIP_ViT-L-14_openai"),
        _mae("mae-b", "vit_base_patch16_224.mae", 12, 768, 85.8, "mae-vit-base-p16"),
        _mae("mae-l", "vit_large_patch16_224.mae", 24, 1024, 303.3, "mae-vit-large-p16"),
    ]
}
PAPER_MODELS = ["vit-s", "vit-b", "vit-l", "dinov2-s", "dinov2-b", "dinov2-l", "clip-b32", "clip-b16", "clip-l"]


def hub_repo(entry: ModelEntry) -> str:
    """The Hugging Face hub repository holding the entry's weights (timm's own copy)."""
    return f"timm/{entry.timm_id}"


def lookup(name: str) -> ModelEntry:
    """Resolve a short name; raise a one-line error with suggestions otherwise."""
    if name in MODELS:
        return MODELS[name]
    raise unknown_name("model", name, MODELS, hint="or timm:<timm id>, hf:<transformers id>, local-dir:<path>")


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise unknown_name("extraction protocol", protocol, PROTOCOLS)
    return protocol


def describe(name: str) -> dict:
    """The `alf models` row of a registry entry, from its static facts (nothing is built or fetched)."""
    e = MODELS[name]
    return {"name": e.name, "source_id": e.timm_id, "family": e.family, "blocks": e.blocks, "width": e.width,
            "tokens": e.tokens, "params_m": e.params_m, "projection": e.projection or "-"}
