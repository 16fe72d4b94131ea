"""Up-front plan for a batch of extractions: what can be reached, and roughly how long and how much disk."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from .errors import AlfError

# effective throughput assumed for the estimate (dense ViT inference, FLOP/s)
THROUGHPUT = {"cpu": 2e11, "cuda": 1e14}


@dataclass
class PlanItem:
    kind: str  # model | dataset
    name: str
    reachable: bool
    reason: str


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_cached(repo_id: str, repo_type: str = "model") -> bool:
    try:
        from huggingface_hub import scan_cache_dir

        return any(r.repo_id == repo_id and r.repo_type == repo_type for r in scan_cache_dir().repos)
    except Exception:
        return False


def check_model(name: str, online: bool) -> PlanItem:
    from .backbones import _is_local
    from .registry import lookup

    if name.startswith("hf:"):
        ident = name[3:]
        if Path(ident).is_dir():
            return PlanItem("model", name, True, "local transformers folder")
        if _hub_cached(ident):
            return PlanItem("model", name, True, f"in the local hub cache ({ident})")
        return PlanItem("model", name, online, f"will download {ident}" if online else
                        f"{ident} not cached and the hub is unreachable")
    local = _is_local(name)
    if local is not None or name.startswith("local-dir:"):
        ok = local is not None and (local / "config.json").is_file()
        return PlanItem("model", name, ok, "local folder" if ok else f"no model folder at {local}")
    source = name[len("timm:"):] if name.startswith("timm:") else None
    if source is None:
        try:
            source = lookup(name).source_id
        except AlfError as e:
            return PlanItem("model", name, False, str(e))
    import timm

    cfg = timm.models.get_pretrained_cfg(source)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if repo and _hub_cached(repo):
        return PlanItem("model", name, True, f"in the local hub cache ({repo})")
    if online:
        return PlanItem("model", name, True, f"will download {repo or source}")
    return PlanItem("model", name, False, f"weights {repo or source} not cached and the hub is unreachable")


def estimate(model_facts: dict, num_images: int, num_layers: int, device: str = "cpu") -> dict:
    """Rough extraction time (s) and store size (bytes, float16 cls + ap) for one model x dataset."""
    flops = 2 * model_facts["params"] * model_facts["tokens"] * num_images
    return {"seconds": flops / THROUGHPUT.get(device, THROUGHPUT["cpu"]),
            "bytes": 2 * num_images * num_layers * model_facts["width"] * 2}


def model_facts(name: str) -> dict | None:
    """params / tokens / width / depth without weights (meta device); None for transformers models."""
    import timm
    import torch

    from .backbones import _is_local
    from .registry import lookup

    if name.startswith("hf:"):
        return None
    local = _is_local(name)
    if local is not None:
        with torch.device("meta"):
            m = timm.create_model(f"local-dir:{local}", pretrained=False)
    else:
        entry = lookup(name) if not name.startswith("timm:") else None
        with torch.device("meta"):
            m = timm.create_model(entry.source_id if entry else name[5:], pretrained=False,
                                  **(entry.create_kwargs if entry else {}))
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
