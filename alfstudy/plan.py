"""What the study wants and what it can reach: models x datasets, checked against the cache (or the hub), with the
estimated extraction time and disk of every model x dataset from alfcache's plan model."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Plan:
    models: list[str]  # reachable ones, in the order given
    datasets: list[str]
    device: str  # cuda | cpu: what the estimates assume
    online: bool  # may the tasks download (the hub is reachable where they run)
    lines: list[str] = field(default_factory=list)
    missing_models: list[str] = field(default_factory=list)
    missing_datasets: list[str] = field(default_factory=list)
    estimates: dict[tuple[str, str], dict] = field(default_factory=dict)  # (dataset, model) -> seconds, bytes


def plan_study(models: list[str], datasets: list[str], device: str, *, online: bool | None = None,
               dtype: str = "float32", plan_all: bool = False) -> Plan:
    """Reachability of every model and dataset (`online=None`: ask the hub from here; False: only what is in the
    cache counts, as on compute nodes without internet) and the estimates (of the unreachable pairs too with
    `plan_all`)."""
    from alfcache.datasets import check_dataset, dataset_size
    from alfcache.plan import check_model, estimate, free_bytes, human_bytes, human_seconds, model_facts
    from alfcache.weights import hub_reachable

    if online is None:
        online = hub_reachable()
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = device.split(":")[0]
    checks = [check_model(m, online) for m in models] + [check_dataset(d, online) for d in datasets]
    plan = Plan([c.name for c in checks if c.kind == "model" and c.reachable],
                [c.name for c in checks if c.kind == "dataset" and c.reachable], device, online)
    plan.missing_models = [c.name for c in checks if c.kind == "model" and not c.reachable]
    plan.missing_datasets = [c.name for c in checks if c.kind == "dataset" and not c.reachable]
    plan.lines.append(f"plan: {len(models)} models x {len(datasets)} datasets on {device}; hub "
                      f"{'reachable' if online else 'NOT reachable (only cached weights and data count)'}")
    plan.lines += [f"  {'ok  ' if c.reachable else 'SKIP'} {c.kind} {c.name}: {c.reason}" for c in checks]
    scale = 2 if dtype == "float32" else 1  # alfcache's estimate counts float16 tokens
    total_s = total_b = 0.0
    for m in dict.fromkeys(models):  # every pair has an estimate; the total counts the reachable ones
        facts = model_facts(m) if m in plan.models or plan_all else None
        if facts is None:
            if m in plan.models:
                plan.lines.append(f"  (no time/disk estimate for {m})")
            continue
        for d in dict.fromkeys(datasets):
            e = estimate(facts, sum(dataset_size(d).values()), facts["depth"], device)
            e = {"seconds": e["seconds"], "bytes": e["bytes"] * scale}
            plan.estimates[(d, m)] = e
            if m in plan.models and d in plan.datasets:
                total_s, total_b = total_s + e["seconds"], total_b + e["bytes"]
    plan.lines.append(f"estimated extraction: {human_seconds(total_s)}, stores {human_bytes(total_b)} "
                      f"(free: {human_bytes(free_bytes(Path('.')))})")
    return plan


def what_it_needs(plan: Plan) -> str:
    """The `alf fetch` command(s) that make the unreachable part of the plan reachable."""
    parts = []
    if plan.missing_models:
        parts.append(f"alf fetch --model {','.join(plan.missing_models)}")
    if plan.missing_datasets:
        parts.append(f"alf fetch --dataset {','.join(plan.missing_datasets)}")
    return " and ".join(f"`{p}`" for p in parts) or "`alf fetch`"


def nothing_to_run(plan: Plan) -> str:
    return (f"nothing to run: no reachable model or dataset (see the plan above). Where there is internet run "
            f"{what_it_needs(plan)}, then rerun with HF_HUB_OFFLINE=1 (or set ALF_DATASETS_DIR to a local dataset "
            f"mirror); `make reproduce-mini` runs the same pipeline offline on embedded data")
