"""The study, above both packages: probing every pair of stores under a root, building reports, and the whole
`reproduce` run (plan, extraction, probes, report), resumable and going on past a failing pair.

User-facing text goes through an `echo` callback (the CLI passes typer.echo); the packages underneath only
raise one-line errors and log.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from alfcache.errors import AlfError
from alfcache.format import StoreError
from probes.errors import ProbeError

Echo = Callable[[str], None]
FAILURES = (AlfError, ProbeError, StoreError)


# ------------------------------------------------------------------------------------------ outputs
def check_output(out: Path, need_bytes: int = 16 << 20) -> None:
    """Before any training: the results folder can be written and has room (a result costs a few MB)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".alf-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise AlfError(f"cannot write results to '{out}': {e.strerror or type(e).__name__} "
                       f"(choose another --out)") from None
    free = shutil.disk_usage(out).free
    if free < need_bytes:
        raise AlfError(f"only {free >> 20} MB free under '{out}', results need about {need_bytes >> 20} MB; "
                       f"free space or choose another --out")


def result_done(folder: Path, head: str, protocol: str, seeds: list[int]) -> bool:
    """Is this head's result for this protocol and these seeds on disk and readable? A damaged file is not."""
    from probes.results import _slug, read_result

    f = folder / f"{_slug(head)}.json"
    if not f.exists():
        return False
    rec = read_result(f)
    return (rec is not None and rec.get("protocol_name") == protocol
            and rec.get("seeds", [rec.get("seed")]) == list(seeds))


def result_line(rec: dict) -> str:
    from probes.results import fmt_spread

    c = rec["chosen"]
    n = rec.get("n_seeds", 1)
    acc = fmt_spread(rec["test_balanced_accuracy"], rec.get("test_balanced_accuracy_std"), n).replace(" (n=", "% (n=")
    acc = acc if n > 1 else acc + "%"
    chosen = f"lr={c['lr']:g} wd={c['wd']:g} dropout={c['dropout']:g}" + (" for seed " + str(rec["seeds"][0]) if n > 1 else "")
    return (f"{rec['dataset']} | {rec['model']} | {rec['head']}: test balanced acc {acc} "
            f"(val {rec['val_balanced_accuracy']:.2f}%, chance {rec.get('chance', float('nan')):.1f}%, {chosen}, "
            f"{rec['params']:,} params)")


# ------------------------------------------------------------------------------------------ probe
def probe_stores(store_root: Path, heads: list[str], out: Path, *, dataset: str | None = None,
                 model: str | None = None, protocol: str = "paper", seed: int = 0, device: str = "auto",
                 allow_incomplete: bool = False, tap: str | None = None, verify: bool = True,
                 distributed: bool = False, seeds: int = 1, echo: Echo = print) -> Path | None:
    """`alf probe`: every (dataset, model) pair under the store root (or the one named), the given heads, one
    result line per head, then the summary table. Returns summary.md (None on ranks > 0)."""
    from probes import ranks as rank_group
    from probes.results import write_summary
    from probes.runner import check_heads, discover, run_heads

    check_heads(heads)
    if distributed and "WORLD_SIZE" not in os.environ:
        raise ProbeError("--distributed needs a torch.distributed launcher (torchrun sets WORLD_SIZE)")
    ranks, device = rank_group.init(device)
    pairs = discover(store_root, dataset, model)
    if ranks.rank == 0:
        check_output(out)
    if len(pairs) > 1 and (dataset is None or model is None):
        echo(f"probing {len(pairs)} dataset x model pairs: {', '.join(f'{p.dataset} x {p.model}' for p in pairs)}")
    for pair in pairs:
        run_heads(pair, heads, protocol, out, seed=seed, device=device, allow_incomplete=allow_incomplete,
                  on_result=(lambda r: echo(result_line(r))) if ranks.rank == 0 else None, tap=tap, verify=verify,
                  seeds=seeds)
    if ranks.rank > 0:
        return None
    _, md, _ = write_summary(out)
    return md


# ------------------------------------------------------------------------------------------ report
def _store_provenance(meta: dict, protocol: str, seeds: int, command: str) -> dict:
    m = meta.get("model", {})
    return {"model_source": m.get("source_id"), "pretrained_weights": m.get("pretrained_weights"),
            "weights_fingerprint": m.get("fingerprint"), "extraction_protocol": meta.get("extraction", {}).get("protocol"),
            "protocol": protocol, "seeds": seeds, "date": time.strftime("%Y-%m-%d %H:%M"), "command": command}


def _results_provenance(rows: list[dict]) -> dict[str, dict]:
    """Per model, from the results: weights, protocols, seeds and each dataset's chance level."""
    out: dict[str, dict] = {}
    for r in rows:
        p = out.setdefault(r["model"], {"model_source": r["model_source"], "pretrained_weights": r["pretrained_weights"],
                                        "weights_fingerprint": r["weights_fingerprint"],
                                        "extraction_protocol": r["extraction_protocol"], "protocol": set(),
                                        "seeds": set(), "datasets": {}})
        p["protocol"].add(str(r["protocol"]))
        p["seeds"].add(r["seeds"])
        p["datasets"][r["dataset"]] = r["chance"]
    for p in out.values():
        p["protocol"] = ", ".join(sorted(p["protocol"]))
        p["seeds"] = "; ".join(sorted(p["seeds"]))
        p["datasets"] = ", ".join(f"{d} ({c})" for d, c in sorted(p["datasets"].items()))
    return out


def build_report(store_root: Path, results: Path, out: Path, *, dataset: str | None = None,
                 model: str | None = None, protocol: str = "quick", cka: str = "linear", layers: bool = True,
                 modules: bool = True, seed: int = 0, seeds: int = 1, device: str = "auto",
                 command: str = "") -> Path:
    """Per-layer accuracy + CKA, module pictures, ALF heatmaps and tables against the paper, linked from
    index.md, with where every number came from."""
    from probes.features import FeatureSet, check_compatible
    from probes.layerwise import layer_sweep, module_sweep
    from probes.report import alf_heatmaps, comparison_tables, layer_report, module_report, write_index
    from probes.results import _slug, collect
    from probes.runner import discover

    sections: dict[str, list] = {"Per-layer linear probes and CKA": [], "ALF layer-attention heatmaps": [],
                                 "Tables": []}
    provenance: dict[str, dict] = {}
    if layers:
        for pair in discover(store_root, dataset, model, skip_unusable=True):
            train, test = FeatureSet.open(pair.train), FeatureSet.open(pair.test)
            check_compatible(train, test)
            prov = _store_provenance(train.meta, protocol, seeds, command)
            rows = layer_sweep(train, test, protocol=protocol, seed=seed, seeds=seeds, device=device, kernel=cka)
            provenance.setdefault(pair.model, {**prov, "datasets": ""})
            d = out / "layers" / _slug(pair.folder) / _slug(pair.model)
            label = f"{pair.dataset} x {pair.model}"
            files = layer_report(rows, d, label, prov)
            sections["Per-layer linear probes and CKA"] += [(label, files["md"]), (f"{label} (plot)", files["png"])]
            if modules and train.module_taps:
                mfiles = module_report(module_sweep(train, test, protocol=protocol, seed=seed, seeds=seeds,
                                                    device=device), d, label, prov)
                sections.setdefault("Module-level probes", []).extend(
                    [(label, mfiles["md"]), (f"{label} (plot)", mfiles["png"])])
    if results.is_dir():
        rows = collect(results)
        provenance.update(_results_provenance(rows))
        for m, files in alf_heatmaps(results, sorted({r["model"] for r in rows}), out / "heatmaps",
                                     provenance=provenance).items():
            sections["ALF layer-attention heatmaps"] += [(f"{m} (plot)", files["png"]), (f"{m} (CSV)", files["csv"])]
        note = f"_Made by `{command or 'alf report'}`; provenance of every model in ../index.md._\n\n"
        for label, path in comparison_tables(results, out / "tables", note).items():
            sections["Tables"].append((label, path))
    return write_index(out, sections, provenance, command)


# ------------------------------------------------------------------------------------------ reproduce
@dataclass
class Plan:
    models: list[str]
    datasets: list[str]
    device: str
    online: bool
    lines: list[str] = field(default_factory=list)
    missing_models: list[str] = field(default_factory=list)
    missing_datasets: list[str] = field(default_factory=list)


def plan_study(models: list[str], datasets: list[str], device: str) -> Plan:
    """What can be reached (cache, mirror, hub), and the estimated extraction time and disk."""
    from alfcache.datasets import check_dataset, dataset_size
    from alfcache.plan import check_model, estimate, free_bytes, human_bytes, human_seconds, model_facts
    from alfcache.weights import hub_reachable

    online = hub_reachable()
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    checks = [check_model(m, online) for m in models] + [check_dataset(d, online) for d in datasets]
    plan = Plan([c.name for c in checks if c.kind == "model" and c.reachable],
                [c.name for c in checks if c.kind == "dataset" and c.reachable], device, online)
    plan.missing_models = [c.name for c in checks if c.kind == "model" and not c.reachable]
    plan.missing_datasets = [c.name for c in checks if c.kind == "dataset" and not c.reachable]
    plan.lines.append(f"plan: {len(models)} models x {len(datasets)} datasets on {device}; hub "
                      f"{'reachable' if online else 'NOT reachable'}")
    plan.lines += [f"  {'ok  ' if c.reachable else 'SKIP'} {c.kind} {c.name}: {c.reason}" for c in checks]
    total_s = total_b = 0.0
    for m in plan.models:
        facts = model_facts(m)
        if facts is None:
            plan.lines.append(f"  (no time/disk estimate for {m})")
            continue
        for d in plan.datasets:
            e = estimate(facts, sum(dataset_size(d).values()), facts["depth"], device.split(":")[0])
            total_s, total_b = total_s + e["seconds"], total_b + e["bytes"]
    plan.lines.append(f"estimated extraction: {human_seconds(total_s)}, stores {human_bytes(total_b)} "
                      f"(free: {human_bytes(free_bytes(Path('.')))})")
    return plan


def _what_it_needs(plan: Plan) -> str:
    parts = []
    if plan.missing_models:
        parts.append(f"alf fetch --model {','.join(plan.missing_models)}")
    if plan.missing_datasets:
        parts.append(f"alf fetch --dataset {','.join(plan.missing_datasets)}")
    how = " and ".join(f"`{p}`" for p in parts) or "`alf fetch`"
    return (f"nothing to run: no reachable model or dataset (see the plan above). Where there is internet run "
            f"{how}, then rerun with HF_HUB_OFFLINE=1 (or set ALF_DATASETS_DIR to a local dataset mirror); "
            f"`make reproduce-mini` runs the same pipeline offline on embedded data")


def _stderr(text: str) -> None:
    import sys

    print(text, file=sys.stderr)


def reproduce(models: list[str], datasets: list[str], heads: list[str], *, root: Path, protocol: str = "paper",
              device: str = "auto", workers: int = 2, batch_size: int = 128, dtype: str = "float32",
              seed: int = 0, seeds: int = 1, command: str = "", echo: Echo = print, echo_err: Echo = _stderr) -> Path:
    """The whole study: extract (complete stores skipped), probe every head (finished heads skipped; a damaged
    result is redone), one line per finished head, a summary, the report. A failing dataset x model pair is
    reported and the rest goes on; the run then ends in an error naming the failed pairs."""
    from alfcache.extract import ExtractConfig, extract
    from alfcache.format import read_metadata
    from probes.features import FeatureSet
    from probes.heads import supported_heads
    from probes.results import result_dir, write_summary
    from probes.runner import discover, run_heads

    plan = plan_study(models, datasets, device)
    for line in plan.lines:
        echo(line)
    if not plan.models or not plan.datasets:
        raise AlfError(_what_it_needs(plan))
    features, results = root / "features", root / "results"
    check_output(results)
    failed, done_heads = [], 0
    for d in plan.datasets:
        for m in plan.models:
            try:  # one broken pair must not stop a study that runs for days: note it and go on
                res = extract(ExtractConfig(model=m, dataset=d, out=features, device=device, workers=workers,
                                            batch_size=batch_size, dtype=dtype,
                                            protocol="clean" if protocol == "clean" else "paper"))
                for r in res:
                    echo(f"{d} x {m} {r.split}: {r.status}")
                meta = read_metadata(res[0].path)
                for pair in discover(features, dataset=meta["dataset"].get("slug") or meta["dataset"]["name"],
                                     model=meta["model"]["name"]):
                    wanted = supported_heads(FeatureSet.open(pair.train)) if heads == ["all"] else heads
                    folder = result_dir(results, pair.folder, pair.model)
                    todo = [h for h in wanted if not result_done(folder, h, protocol, list(range(seed, seed + seeds)))]
                    echo(f"{pair.dataset} x {pair.model}: {len(wanted) - len(todo)} of {len(wanted)} heads done"
                         + (f", running {', '.join(todo)}" if todo else ""))
                    if todo:
                        recs = run_heads(pair, todo, protocol, results, seed=seed, seeds=seeds, device=device,
                                         on_result=lambda r: echo(result_line(r)))
                        done_heads += len(recs)
            except FAILURES as e:
                echo_err(f"FAILED {d} x {m}: {e}")
                failed.append(f"{d} x {m}")
    _, md, rows = write_summary(results)
    index = build_report(features, results, root / "reports", protocol="quick", seed=seed, seeds=seeds,
                         device=device, command=command)
    echo(f"done: {done_heads} heads trained now, {len(rows)} results in {results}/ (summary.md), report {index}")
    if failed:
        raise AlfError(f"{len(failed)} dataset x model pair(s) failed: {', '.join(failed)}; "
                       f"fix the cause and rerun to do only what is missing")
    return index
