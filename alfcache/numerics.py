"""Numerics of an extraction run: which autocast dtype, which attention kernels, and whether the autocast
tokens agree with float32 ones on a few real images before anything is written.

Tokens computed under bf16/fp16 autocast differ from float32 ones (dinov2 #64: results shift with precision
and attention kernels). So a run records the autocast dtype and the attention backend in the store, and
before extracting compares every tapped array of a few images under autocast against float32: the worst
per-token cosine similarity and relative error go into the metadata, and a disagreement beyond the limit
stops the run with one line, before anything is written.
"""
from __future__ import annotations

import torch

from .errors import AlfError

AMP_CHOICES = ("auto", "off", "bf16", "fp16")
MIN_COSINE = 0.99  # per token, worst over the check images, layers and token kinds


def resolve_autocast(amp: str | bool, device: torch.device) -> str | None:
    """The autocast dtype name for `--amp` on `device`: auto = bf16 (fp16 where bf16 is unsupported) on CUDA,
    off on CPU; bf16 / fp16 force it (CPU autocast included); off = float32."""
    if amp is True:
        amp = "auto"
    if amp is False or amp is None:
        amp = "off"
    if amp not in AMP_CHOICES:
        raise AlfError(f"unknown --amp '{amp}' (known: {', '.join(AMP_CHOICES)})")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return {"bf16": "bfloat16", "fp16": "float16"}[amp]


def attention_backend(model: torch.nn.Module, device: torch.device) -> dict:
    """What computes attention: timm's fused-attention switch or the transformers implementation, and the
    scaled-dot-product kernels torch may pick on this device."""
    info: dict = {"device_type": device.type}
    fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    if fused:
        info["timm_fused_attn"] = bool(all(fused))
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl:
        info["transformers_attn_implementation"] = impl
    if device.type == "cuda":
        b = torch.backends.cuda
        info["sdpa_kernels_enabled"] = {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
                                        "math": b.math_sdp_enabled(), "cudnn": b.cudnn_sdp_enabled()}
    else:
        info["sdpa_kernels_enabled"] = {"cpu": True}
    return info


def _compare(ref: torch.Tensor, amp: torch.Tensor) -> tuple[float, float]:
    """Worst per-token cosine similarity and relative L2 error of amp against ref, tokens on the last axis."""
    ref, amp = ref.float().flatten(0, -2), amp.float().flatten(0, -2)
    cos = torch.nn.functional.cosine_similarity(ref, amp, dim=-1, eps=1e-12)
    rel = (ref - amp).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)
    return float(cos.min()), float(rel.max())


def amp_agreement(forward, collector, x: torch.Tensor, autocast: str, min_cosine: float = MIN_COSINE) -> dict:
    """Run `forward(x)` in float32 and under autocast with the collector attached; compare every collected
    array. Returns the record stored in the metadata; raises AlfError if the worst cosine is below the limit."""
    device_type = x.device.type
    with collector.attached(), torch.inference_mode():
        forward(x)
        ref = {k: v.clone() for k, v in collector.collect().items()}
        with torch.autocast(device_type, dtype=getattr(torch, autocast)):
            forward(x)
        got = collector.collect()
    worst_cos, worst_rel, where = 1.0, 0.0, None
    for name in sorted(ref):
        c, r = _compare(ref[name], got[name])
        if c < worst_cos:
            worst_cos, where = c, name
        worst_rel = max(worst_rel, r)
    record = {"autocast": autocast, "images": int(x.shape[0]), "min_cosine": worst_cos, "max_rel_error": worst_rel,
              "worst_array": where, "limit_min_cosine": min_cosine}
    if worst_cos < min_cosine:
        raise AlfError(f"{autocast} autocast disagrees with float32 on {x.shape[0]} images (worst token cosine "
                       f"{worst_cos:.4f} in '{where}', limit {min_cosine}); nothing written - rerun with --amp off")
    return record
