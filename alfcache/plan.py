"""Up-front plan for a batch of extractions: what can be reached, and roughly how long and how much disk."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import AlfError
from .registry import MODELS
from .weights import cached_repo, hub_reachable  # noqa: F401  (hub_reachable: used by the study's plan)

# effective throughput assumed for the estimate (dense ViT inference, FLOP/s)
THROUGHPUT = {"cpu": 2e11, "cuda": 1e14}


@dataclass
class PlanItem:
    kind: str  # model | dataset
    name: str
    reachable: bool
    reason: str


def check_model(name: str, online: bool) -> PlanItem:
    """Can this model's weights be had? (registry and timm: the hub repo in the cache; local folders: present)"""
    from .registry import hub_repo
    from .sources import parse_model

    try:
        src = parse_model(name)
    except AlfError as e:
        return PlanItem("model", name, False, str(e))
    if src.local is not None:
        return PlanItem("model", name, True, "local folder")
    if src.kind == "registry":
        repo = hub_repo(MODELS[src.ident])
    elif src.kind == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(src.ident)
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not repo:
            return PlanItem("model", name, False, f"timm model {src.ident} has no weights on the hub")
    else:
        repo = src.ident
    if cached_repo(repo) is not None:
        return PlanItem("model", name, True, f"in the local hub cache ({repo})")
    if online:
        return PlanItem("model", name, True, f"will download {repo}")
    return PlanItem("model", name, False, f"weights {repo} not cached and the hub is unreachable")


def estimate(model_facts: dict, num_images: int, num_layers: int, device: str = "cpu") -> dict:
    """Rough extraction time (s) and store size (bytes, float16 cls + ap) for one model x dataset."""
    flops = 2 * model_facts["params"] * model_facts["tokens"] * num_images
    return {"seconds": flops / THROUGHPUT.get(device, THROUGHPUT["cpu"]),
            "bytes": 2 * num_images * num_layers * model_facts["width"] * 2}


def model_facts(name: str) -> dict | None:
    """params / tokens / width / depth without weights (registry: static; others: meta device); None for
    transformers models."""
    import torch

    from .sources import parse_model

    src = parse_model(name)
    if src.kind == "hf":
        return None
    if src.kind == "registry":
        e = MODELS[src.ident]
        return {"params": int(e.params_m * 1e6), "width": e.width, "depth": e.blocks, "tokens": e.tokens}
    import timm

    with torch.device("meta"):
        m = timm.create_model(f"local-dir:{src.ident}" if src.kind == "local-dir" else src.ident, pretrained=False)
    return {"params": sum(p.numel() for p in m.parameters()), "width": int(m.embed_dim), "depth": len(m.blocks),
            "tokens": int(getattr(m, "num_prefix_tokens", 1)) + int(m.patch_embed.num_patches)}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def human_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h")


def free_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists():
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
