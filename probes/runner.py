"""Find train/test stores by their metadata and run heads on them, writing result files."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


from alfcache.format import StoreError, find_stores, read_metadata

from .errors import ProbeError, unknown_name
from .features import FeatureSet, check_compatible, verify_store
from .ranks import current as current_ranks
from .results import write_result
from .fit import fit
from .heads import HEADS, head_spec, supported_heads


@dataclass
class StorePair:
    dataset: str
    model: str
    train: Path
    test: Path


def discover(store_root: str | Path, dataset: str | None = None, model: str | None = None, *,
             skip_unusable: bool = False) -> list[StorePair]:
    """Group the stores under `store_root` by (dataset, model) from their metadata, not their file names.
    With `skip_unusable`, groups lacking a split or holding an incomplete store are left out (reports)."""
    root = Path(store_root)
    if not root.is_dir():
        raise ProbeError(f"store root '{root}' does not exist; run `alf extract` first or pass --store-root")
    found: dict[tuple[str, str], dict[str, Path]] = {}
    for p in find_stores(root):
        try:
            m = read_metadata(p)
        except StoreError:
            continue
        key = (m["dataset"]["name"], m["model"]["name"])
        if skip_unusable and not m.get("complete"):
            continue
        found.setdefault(key, {})[m["split"]] = p
    if not found:
        raise ProbeError(f"no alfcache stores under '{root}'; run `alf extract` first")
    datasets = sorted({k[0] for k in found})
    models = sorted({k[1] for k in found})
    if dataset is not None and dataset not in datasets:
        raise unknown_name("dataset (in the stores)", dataset, datasets)
    if model is not None and model not in models:
        raise unknown_name("model (in the stores)", model, models)
    pairs = []
    for (d, m), splits in sorted(found.items()):
        if (dataset and d != dataset) or (model and m != model):
            continue
        if "train" not in splits or "test" not in splits:
            if skip_unusable:
                continue
            raise ProbeError(f"dataset '{d}' x model '{m}' needs both train and test stores; found {sorted(splits)}")
        pairs.append(StorePair(d, m, splits["train"], splits["test"]))
    if not pairs:
        raise ProbeError(f"no stores for dataset={dataset} model={model} under '{root}'")
    return pairs


def run_heads(pair: StorePair, heads: list[str], protocol: str | dict, out: Path, *, seed: int = 0, device=None,
              allow_incomplete: bool = False, progress: bool = True, on_result=None, tap: str | None = None,
              verify: bool = True) -> list[dict]:
    if verify and not allow_incomplete:
        for p in (pair.train, pair.test):
            verify_store(p)
    train = FeatureSet.open(pair.train, allow_incomplete=allow_incomplete)
    test = FeatureSet.open(pair.test, allow_incomplete=allow_incomplete)
    check_compatible(train, test)
    train, test = train.select_tap(tap), test.select_tap(tap)
    if heads == ["all"]:
        heads = supported_heads(train)
    for h in heads:
        if h not in HEADS:
            raise unknown_name("head", h, list(HEADS) + ["all"])
        if HEADS[h].tokens.patches and train.patches is None:
            raise ProbeError(f"head '{h}' needs last-layer patch tokens; the store has none (extract with --patches)")
    records = []
    for h in heads:
        t0 = time.perf_counter()
        probe = fit(train, h, protocol=protocol, seed=seed, device=device, progress=progress)
        rec = dict(probe.record)
        name = h if not tap else f"{h}@{tap}"
        rec.update({"dataset": pair.dataset, "model": pair.model, "head": name, "tap": tap or "main", "protocol_name": protocol if isinstance(protocol, str) else "custom",
                    "train_store": str(pair.train), "test_store": str(pair.test),
                    "weights_fingerprint": train.meta.get("model", {}).get("fingerprint"),
                    "pretrained_weights": train.meta.get("model", {}).get("pretrained_weights"),
                    "test_balanced_accuracy": probe.balanced_accuracy(test), "test_top1": probe.top1(test),
                    "n_test": len(test), "token_names": probe.token_names, "wall_seconds": time.perf_counter() - t0})
        records.append(rec)
        if current_ranks().rank > 0:  # every rank holds the same result; rank 0 writes it
            continue
        att = probe.attention(test) if head_spec(h).has_attention else None
        path = write_result(out, pair.dataset, pair.model, name, rec, att, probe.token_names)
        probe.save(path.with_name(path.stem + "_probe"))
        if on_result:
            on_result(rec)
    return records
