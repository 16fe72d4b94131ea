"""transformers backend: `hf:<model id>` (ViT, DINOv2 (with registers), CLIP vision towers) with the
same tap vocabulary as timm and the model's own image processor."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import AlfError
from .taps import Layout

LAYOUTS = {
    "vit": Layout("encoder.layer", "layernorm_before", "attention", "layernorm_after", "intermediate.dense",
                  "intermediate.intermediate_act_fn", "output.dense", "layernorm"),
    "dinov2": Layout("encoder.layer", "norm1", "attention", "norm2", "mlp.fc1", "mlp.activation", "mlp.fc2",
                     "layernorm"),
    # transformers' CLIP applies post_layernorm to the pooled CLS only; we apply it to every token of the
    # encoder's output, as timm and OpenCLIP do, so AP of the final layer is defined the same way
    "clip": Layout("vision_model.encoder.layers", "layer_norm1", "self_attn", "layer_norm2", "mlp.fc1",
                   "mlp.activation_fn", "mlp.fc2", "vision_model.post_layernorm", final_on="vision_model.encoder"),
}
LAYOUTS["dinov2_with_registers"] = LAYOUTS["dinov2"]
LAYOUTS["clip_vision_model"] = LAYOUTS["clip"]


class ProcessorTransform:
    """PIL image -> (3, H, W) float tensor through the model's own image processor (picklable for workers)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, img):
        return self.processor(images=img, return_tensors="pt")["pixel_values"][0]

    def __repr__(self):
        return f"{type(self.processor).__name__}({self.processor.to_json_string()})".replace("\n", " ")


def load_hf_backbone(name: str):
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModel

    from .backbones import Backbone

    ident = name[len("hf:"):]
    local = Path(ident).is_dir()
    source_id = f"hf:{Path(ident).resolve()}" if local else name
    try:
        config = AutoConfig.from_pretrained(ident)
        kind = config.model_type
        if kind not in LAYOUTS:
            raise AlfError(f"model '{name}' is a transformers '{kind}' model; supported: {', '.join(sorted(LAYOUTS))}")
        cls = CLIPVisionModel if kind.startswith("clip") else AutoModel
        model = cls.from_pretrained(ident)
        processor = AutoImageProcessor.from_pretrained(ident)
    except AlfError:
        raise
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        where = f"from '{ident}'" if local else "from the Hugging Face hub"
        raise AlfError(f"could not fetch weights for model '{name}' {where}: {reason}") from None
    model.eval()
    vcfg = getattr(model.config, "vision_config", model.config)
    layout = LAYOUTS[kind]
    regs = int(getattr(vcfg, "num_register_tokens", 0) or 0)
    transform = ProcessorTransform(processor)
    size = transform(_blank()).shape[-2:]
    side = size[-1] // vcfg.patch_size
    pre = processor.to_dict()
    data_config = {"processor": type(processor).__name__, "input_size": [3, *size],
                   "mean": pre.get("image_mean"), "std": pre.get("image_std"), "resize": pre.get("size"),
                   "crop": pre.get("crop_size"), "resample": pre.get("resample")}
    display = f"hf-local-{Path(ident).resolve().name}" if local else name
    return Backbone(name=display, source_id=source_id, model=model, data_config=data_config, library="transformers",
                    layout=layout, transform_fn=transform,
                    depth=len(dict(model.named_modules())[layout.blocks]), width=int(vcfg.hidden_size),
                    num_prefix_tokens=1 + regs, num_registers=regs, num_patches=side * side)


def _blank():
    from PIL import Image

    return Image.new("RGB", (64, 64))
