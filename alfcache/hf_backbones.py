"""transformers backend: `hf:<model id>` (ViT, DINOv2 (with registers), CLIP vision towers) with the
same tap vocabulary as timm and the model's own image processor."""
from __future__ import annotations

import torch

from .backbone import Backbone
from .errors import AlfError
from .sources import ModelSource
from .taps import Layout
from .weights import hub_reachable, ways_out

SUPPORTED = ("vit", "dinov2", "dinov2_with_registers", "clip", "clip_vision_model")
# module names differ across transformers versions (e.g. 4.x `encoder.layer.i.intermediate.dense`,
# 5.x `layers.i.mlp.fc1`): the layout is read off the model's own module names
_CANDIDATES = {
    "blocks": ("encoder.layer", "encoder.layers", "layers", "vision_model.encoder.layers"),
    "norm1": ("layernorm_before", "norm1", "layer_norm1"),
    "attn": ("attention", "self_attn"),
    "norm2": ("layernorm_after", "norm2", "layer_norm2"),
    "fc1": ("mlp.fc1", "intermediate.dense"),
    "act": ("mlp.activation_fn", "mlp.activation", "intermediate.intermediate_act_fn", "mlp.act"),
    "fc2": ("mlp.fc2", "output.dense"),
    "final": ("layernorm", "post_layernorm", "vision_model.post_layernorm"),
}


def detect_layout(model: torch.nn.Module) -> Layout:
    names = dict(model.named_modules())

    def first(key, prefix=""):
        for c in _CANDIDATES[key]:
            if prefix + c in names:
                return c
        raise AlfError(f"cannot find the {key} module of this {type(model).__name__} "
                       f"(looked for {', '.join(_CANDIDATES[key])})")

    blocks = first("blocks")
    b0 = f"{blocks}.0."
    final = first("final")
    # transformers' CLIP applies post_layernorm to the pooled CLS only; we apply it to every token of the
    # encoder's output, as timm and OpenCLIP do, so AP of the final layer is defined the same way
    final_on = blocks.rsplit(".", 1)[0] if "post_layernorm" in final else None
    return Layout(blocks, first("norm1", b0), first("attn", b0), first("norm2", b0), first("fc1", b0),
                  first("act", b0), first("fc2", b0), final, final_on=final_on)


class ProcessorTransform:
    """PIL image -> (3, H, W) float tensor through the model's own image processor (picklable for workers)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, img):
        return self.processor(images=img, return_tensors="pt")["pixel_values"][0]

    def __repr__(self):
        return f"{type(self.processor).__name__}({self.processor.to_json_string()})".replace("\n", " ")


def load_hf_backbone(src: ModelSource) -> Backbone:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModel

    ident = src.ident
    local = src.local is not None
    offline = not local and not hub_reachable()  # cache only: fail at once instead of retrying a dead network
    try:
        config = AutoConfig.from_pretrained(ident, local_files_only=offline)
        kind = config.model_type
        if kind not in SUPPORTED:
            raise AlfError(f"model '{src.spec}' is a transformers '{kind}' model; supported: {', '.join(SUPPORTED)}")
        cls = CLIPVisionModel if kind.startswith("clip") else AutoModel
        model = cls.from_pretrained(ident, local_files_only=offline)
        processor = AutoImageProcessor.from_pretrained(ident, local_files_only=offline)
    except AlfError:
        raise
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if local:
            raise AlfError(f"cannot load the transformers model in '{ident}': {reason}") from None
        why = "not in the Hugging Face cache and the hub is unreachable" if offline else reason
        raise AlfError(f"model '{src.spec}': cannot get {ident} ({why}); {ways_out('model', src.spec)}") from None
    model.eval()
    vcfg = getattr(model.config, "vision_config", model.config)
    layout = detect_layout(model)
    regs = int(getattr(vcfg, "num_register_tokens", 0) or 0)
    transform = ProcessorTransform(processor)
    size = transform(_blank()).shape[-2:]
    side = size[-1] // vcfg.patch_size
    pre = processor.to_dict()
    data_config = {"processor": type(processor).__name__, "input_size": [3, *size],
                   "mean": pre.get("image_mean"), "std": pre.get("image_std"), "resize": pre.get("size"),
                   "crop": pre.get("crop_size"), "resample": pre.get("resample")}
    return Backbone(name=src.name, source_id=src.source_id, model=model, data_config=data_config,
                    library="transformers", layout=layout, transform_fn=transform,
                    depth=len(dict(model.named_modules())[layout.blocks]), width=int(vcfg.hidden_size),
                    num_prefix_tokens=1 + regs, num_registers=regs, num_patches=side * side,
                    architecture={"transformers_class": type(model).__name__, "model_type": kind})


def _blank():
    from PIL import Image

    return Image.new("RGB", (64, 64))
