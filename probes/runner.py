"""Find train/test stores by their metadata and run heads on them, writing result files."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


from alfcache.format import StoreError, dataset_key, find_stores, location, mirror_store, model_key, read_metadata

from .errors import ProbeError, unknown_name
from .features import FeatureSet, check_compatible, verify_store
from .ranks import current as current_ranks
from .results import combine_seeds, write_result
from .fitting import fit
from .heads import HEADS, check_heads, head_spec, supported_heads


@dataclass
class StorePair:
    dataset: str  # the dataset name the stores record (for people)
    model: str
    train: Path
    test: Path
    slug: str = ""  # unique folder name of the dataset (the store folder's): results go under it

    @property
    def folder(self) -> str:
        return self.slug or self.dataset


def _label(meta: dict) -> str:
    d = meta["dataset"]  # every store records its dataset (read_metadata's stores; pairing reads its name)
    src = d.get("source")
    return f"'{d.get('name')}'" + (f" (source {src})" if src else "")


Groups = dict[tuple, dict[str, tuple[Path, dict]]]  # (dataset identity, model identity) -> split -> (path, meta)


def _names(splits: dict) -> tuple[str, str]:
    meta = next(iter(splits.values()))[1]
    return meta["dataset"]["name"], meta["model"]["name"]


def _read_stores(root: Path, skip_unusable: bool) -> tuple[Groups, dict[Path, StoreError]]:
    """Every store under root grouped by identity, and the ones that cannot be read."""
    groups: Groups = {}
    damaged: dict[Path, StoreError] = {}
    for p in find_stores(root):
        try:
            m = read_metadata(p)
        except StoreError as e:
            damaged[p] = e
            continue
        if skip_unusable and not m.get("complete"):
            continue
        groups.setdefault((dataset_key(m), model_key(m)), {}).setdefault(m["split"], (p, m))
    return groups, damaged


def _explain_missing(key: tuple, splits: dict, groups: Groups, damaged: dict[Path, StoreError]) -> ProbeError:
    """Why a group has no pair: a store of the other split with the same names but another identity (named
    with both sources), a damaged store where the other split should be, or simply a missing split."""
    d, m = _names(splits)
    have = sorted(splits)
    want = "test" if "train" in splits else "train"
    path, meta = next(iter(splits.values()))
    for other_key, other in groups.items():
        if other_key != key and _names(other) == (d, m) and want in other:
            op, om = other[want]
            what = []
            if dataset_key(meta) != dataset_key(om):
                if _label(meta) != _label(om):
                    what.append(f"dataset source ({_label(meta)} vs {_label(om)})")
                else:  # one source, another list of images (another version, or files changed)
                    fp = lambda m: str(m["dataset"].get("index_fingerprint"))[:19]  # noqa: E731
                    what.append(f"dataset index (the images of {_label(meta)}: {fp(meta)}... vs {fp(om)}...)")
            if model_key(meta) != model_key(om):
                what.append(f"model or weights fingerprint ({meta['model']['fingerprint'][:19]}... vs "
                            f"{om['model']['fingerprint'][:19]}...)")
            return ProbeError(f"the {have[0]} store '{path}' and the {want} store '{op}' have the same names but "
                              f"differ in {' and '.join(what)}; they are not a pair - extract both splits from "
                              f"the same dataset with the same model")
    for bad, err in damaged.items():
        if bad.parent == path.parent and bad.stem == want:
            return err
    return ProbeError(f"dataset '{d}' x model '{m}' needs both train and test stores; found {have} "
                      f"(run `alf extract` for the missing split)")


def discover(store_root: str | Path, dataset: str | None = None, model: str | None = None, *,
             skip_unusable: bool = False) -> list[StorePair]:
    """Pair the train and test stores under `store_root` by identity - the dataset's resolved source and index
    fingerprint, the model's origin and weights - from their metadata, never by file or typed names. `dataset`
    matches a recorded name or dataset folder name. A store that cannot be read is named as damaged where it
    would have completed a pair. With `skip_unusable`, groups lacking a split or holding an incomplete store are
    left out (reports)."""
    root = location(store_root)
    if not root.is_dir():
        raise ProbeError(f"store root '{root}' does not exist; run `alf extract` first or pass --store-root")
    groups, damaged = _read_stores(root, skip_unusable)
    if not groups and not damaged:
        raise ProbeError(f"no alfcache stores under '{root}'; run `alf extract` first")
    slug = lambda splits: next(iter(splits.values()))[1]["dataset"].get("slug", "")  # noqa: E731
    datasets = sorted({_names(s)[0] for s in groups.values()} | {slug(s) for s in groups.values()} - {""})
    models = sorted({_names(s)[1] for s in groups.values()})
    if dataset is not None and dataset not in datasets:
        if damaged:
            raise next(iter(damaged.values()))
        raise unknown_name("dataset (in the stores)", dataset, datasets)
    if model is not None and model not in models:
        raise unknown_name("model (in the stores)", model, models)
    pairs = []
    for key, splits in sorted(groups.items(), key=lambda kv: _names(kv[1])):
        d, m = _names(splits)
        if (dataset and dataset not in (d, slug(splits))) or (model and m != model):
            continue
        if "train" in splits and "test" in splits:
            pairs.append(StorePair(d, m, splits["train"][0], splits["test"][0], slug(splits)))
        elif not skip_unusable:
            raise _explain_missing(key, splits, groups, damaged)
    if not pairs:
        if damaged and not skip_unusable:
            raise next(iter(damaged.values()))
        raise ProbeError(f"no stores for dataset={dataset} model={model} under '{root}'")
    return pairs


def run_heads(pair: StorePair, heads: list[str], protocol: str | dict, out: Path, *, seed: int = 0, device=None,
              allow_incomplete: bool = False, progress: bool = True, on_result=None, tap: str | None = None,
              verify: bool = True, seeds: int = 1, cache_dir: str | Path | None = None) -> list[dict]:
    """Fit each head on the pair's train store with `seeds` seeds (seed, seed + 1, ...: each its own validation
    split, initialisation and batches; the grid in one pass per seed), score it on the test store, and write one
    result per head: the scores' mean and spread over seeds, every seed's own figures, the attention weights
    (mean over seeds) and each seed's probe. With `cache_dir`, stores on object storage are copied there once and
    verified and read locally."""
    check_heads(heads)
    where = {"train": pair.train, "test": pair.test}
    if cache_dir is not None and not allow_incomplete:
        where = {k: mirror_store(p, cache_dir) for k, p in where.items()}
    train = FeatureSet.open(where["train"], allow_incomplete=allow_incomplete)
    test = FeatureSet.open(where["test"], allow_incomplete=allow_incomplete)
    check_compatible(train, test)
    opened = {"train": train._handle, "test": test._handle}  # verified below through the same open arrays
    train, test = train.select_tap(tap), test.select_tap(tap)
    heads = supported_heads(train) if heads == ["all"] else heads
    check_heads(heads, has_patches=train.patches is not None)
    if verify and not allow_incomplete:
        for split, p in where.items():
            verify_store(p, opened=opened[split])
    records = []
    for h in heads:
        name = h if not tap else f"{h}@{tap}"
        per_seed, probes, attention = [], [], []
        for s in range(seed, seed + seeds):
            t0 = time.perf_counter()
            probe = fit(train, h, protocol=protocol, seed=s, device=device, progress=progress)
            per_seed.append({**probe.record, "test_balanced_accuracy": probe.balanced_accuracy(test),
                             "test_top1": probe.top1(test), "wall_seconds": time.perf_counter() - t0})
            probes.append(probe)
            if head_spec(h).has_attention and current_ranks().rank == 0:
                attention.append(probe.attention(test))
        rec = combine_seeds(per_seed)
        rec.update(_provenance(pair, train, test, name, tap, protocol), token_names=probes[0].token_names)
        records.append(rec)
        if current_ranks().rank > 0:  # every rank holds the same result; rank 0 writes it
            continue
        att = np.mean(attention, axis=0) if attention else None
        path = write_result(out, pair.folder, pair.model, name, rec, att, probes[0].token_names)
        for s, probe in zip(rec["seeds"], probes):
            probe.save(path.with_name(path.stem + ("_probe" if s == seed else f"_probe_seed{s}")))
        if on_result:
            on_result(rec)
    return records


def _provenance(pair: StorePair, train: FeatureSet, test: FeatureSet, name: str, tap, protocol) -> dict:
    """Where a result's numbers come from: stores, dataset and model identity, protocols, chance, time. (Every
    store records its dataset and model - pairing reads them; the extraction record may be absent.)"""
    meta = train.meta
    present = len(np.unique(test.labels[test.rows]))
    return {"dataset": pair.dataset, "dataset_folder": pair.folder, "model": pair.model, "head": name,
            "tap": tap or "main", "protocol_name": protocol if isinstance(protocol, str) else "custom",
            "train_store": str(pair.train), "test_store": str(pair.test),
            "dataset_source": meta["dataset"].get("source"),
            "model_source": meta["model"].get("source_id"),
            "weights_fingerprint": meta["model"].get("fingerprint"),
            "pretrained_weights": meta["model"].get("pretrained_weights"),
            "extraction_protocol": meta.get("extraction", {}).get("protocol"),
            "n_test": len(test), "chance": 100.0 / present, "class_names": list(test.class_names),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
