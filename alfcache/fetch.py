"""`alf fetch`: put weights and datasets into the standard Hugging Face cache where there is internet (a login
node), so jobs elsewhere run with HF_HUB_OFFLINE=1; and `--check`: what is cached, what is missing, how much disk
the missing part needs. No cache layout of our own: huggingface_hub's, under HF_HOME / HF_HUB_CACHE. Downloads
show huggingface_hub's progress and resume where an interrupted one stopped.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

from .datasets import HUB_DATASETS, PAPER_DATASETS
from .errors import AlfError, unknown_name
from .registry import MODELS, PAPER_MODELS, hub_repo
from .sources import parse_model
from .weights import WEIGHT_FILES, cached_repo, hub_reachable

MODEL_PATTERNS = ("*.json", "*.safetensors", "*.txt")  # transformers models: config, weights, processor
TIMM_PATTERNS = ("config.json", "model.safetensors")


@dataclass
class FetchItem:
    kind: str  # model | dataset
    name: str  # as the user names it
    repo: str
    repo_type: str  # model | dataset
    patterns: tuple[str, ...]
    cached_bytes: int = 0
    missing_bytes: int | None = None  # None: unknown (hub unreachable)
    missing: list[str] = field(default_factory=list)
    complete: bool = False


def items_for(models: list[str] | None, datasets: list[str] | None, splits: tuple[str, ...] = ("train", "test")
              ) -> list[FetchItem]:
    """What `alf fetch` would download for these names (None for both: the paper's study)."""
    if models is None and datasets is None:
        models, datasets = list(PAPER_MODELS), list(PAPER_DATASETS)
    items = []
    for name in models or []:
        src = parse_model(name)
        if src.local is not None:
            raise AlfError(f"model '{name}' is a local folder: nothing to fetch")
        if src.kind == "registry":
            items.append(FetchItem("model", name, hub_repo(MODELS[src.ident]), "model", TIMM_PATTERNS))
        elif src.kind == "timm":
            import timm

            cfg = timm.models.get_pretrained_cfg(src.ident)
            repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
            if not repo:
                raise AlfError(f"timm model '{src.ident}' has no weights on the Hugging Face hub")
            items.append(FetchItem("model", name, repo, "model", TIMM_PATTERNS))
        else:
            items.append(FetchItem("model", name, src.ident, "model", MODEL_PATTERNS))
    for name in datasets or []:
        if name in HUB_DATASETS:
            items.append(FetchItem("dataset", name, HUB_DATASETS[name].repo, "dataset",
                                   tuple(f"{s}/*" for s in splits) + ("classnames.txt",)))
        elif name.startswith("hf:") and not Path(name[3:]).is_dir():
            items.append(FetchItem("dataset", name, name[3:], "dataset", ("*",)))
        else:
            raise unknown_name("dataset to fetch", name, list(HUB_DATASETS),
                               hint="or hf:<dataset id>; digits and image folders need no fetching")
    return items


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in patterns)


def check(items: list[FetchItem]) -> list[FetchItem]:
    """Fill in, for each item, what the cache holds and (when the hub is reachable) what is missing and its size."""
    online = hub_reachable()
    api = None
    if online:
        from huggingface_hub import HfApi

        api = HfApi()
    for it in items:
        snap = cached_repo(it.repo, it.repo_type)
        have = {}
        if snap is not None:
            have = {str(p.relative_to(snap)): p.stat().st_size for p in snap.rglob("*") if p.is_file()}
        it.cached_bytes = sum(have.values())
        if api is None:
            want_weights = it.kind == "model" and it.patterns == TIMM_PATTERNS
            it.complete = any(w in have for w in WEIGHT_FILES) if want_weights else bool(have)
            it.missing_bytes = None if not it.complete else 0
            continue
        try:
            if it.repo_type == "model":
                info = api.model_info(it.repo, files_metadata=True)
            else:
                info = api.dataset_info(it.repo, files_metadata=True)
        except Exception as e:
            raise AlfError(f"{it.kind} '{it.name}': cannot read {it.repo} on the hub ({type(e).__name__})") from None
        remote = {s.rfilename: (s.size or 0) for s in info.siblings if _matches(s.rfilename, it.patterns)}
        it.missing = sorted(f for f in remote if f not in have)
        it.missing_bytes = sum(remote[f] for f in it.missing)
        it.complete = not it.missing
    return items


def fetch(items: list[FetchItem]) -> list[Path]:
    """Download every item into the Hugging Face cache (resuming partial downloads); returns the snapshots."""
    if not hub_reachable():
        raise AlfError("the Hugging Face hub cannot be reached from here; run `alf fetch` where there is internet "
                       "(a login node) - the cache it fills (HF_HOME / HF_HUB_CACHE) is what offline jobs read")
    from huggingface_hub import snapshot_download

    out = []
    for it in items:
        try:
            out.append(Path(snapshot_download(it.repo, repo_type=it.repo_type, allow_patterns=list(it.patterns))))
        except Exception as e:
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise AlfError(f"{it.kind} '{it.name}': download of {it.repo} failed ({reason}); rerun to resume") from None
    return out
