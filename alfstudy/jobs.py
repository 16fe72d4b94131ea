"""From a plan to tasks: an extraction task per dataset x model (or a dataset x a group of models sharing one
decode), a probe task per extraction task (the pairs it made), a probe task per pair whose stores are already
complete, and one report. What the durable markers show as done is dropped before anything is submitted."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import state

Echo = Callable[[str], None]  # where user-facing lines go (print, typer.echo, a task's log)


@dataclass
class Study:
    """Everything a task needs to do its part; pickled into each Slurm task."""

    root: Path
    heads: list[str]
    protocol: str = "paper"
    seed: int = 0
    seeds: int = 1
    device: str = "auto"
    workers: int = 2
    batch_size: int = 128
    dtype: str = "float32"
    command: str = ""
    online: bool = True  # may tasks download; False: HF_HUB_OFFLINE=1 in every task

    @property
    def features(self) -> Path:
        return Path(self.root) / "features"

    @property
    def results(self) -> Path:
        return Path(self.root) / "results"

    @property
    def reports(self) -> Path:
        return Path(self.root) / "reports"

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seed, self.seed + self.seeds))


@dataclass(frozen=True)
class Unit:
    """One task's share: a dataset and the models it runs (one, or a group that shares a decode)."""

    dataset: str
    models: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.dataset} x {','.join(self.models)}"


@dataclass
class Tasks:
    extract: list[Unit] = field(default_factory=list)  # each followed by a probe task for the same unit
    probe_only: list[Unit] = field(default_factory=list)  # stores complete, heads missing
    done: list[tuple[str, str]] = field(default_factory=list)  # (dataset, model) with every head finished

    @property
    def empty(self) -> bool:
        return not self.extract and not self.probe_only


def extraction_done(study: Study, dataset: str, model: str) -> bool:
    """The pair's extraction marker says done and every store it names is complete."""
    from alfcache.format import StoreError, read_metadata

    rec = state.read(state.marker(study.root, "extract", dataset, model))
    if not rec or rec.get("state") != "done" or not rec.get("stores"):
        return False
    try:
        return all(read_metadata(p).get("complete") for p in rec["stores"])
    except (StoreError, OSError, ValueError):
        return False


def probing_done(study: Study, dataset: str, model: str) -> bool:
    """The pair's probe marker says done and each of its heads has a readable result for this protocol and these
    seeds (the heads asked for now: all of them when 'all', else those named)."""
    from .results import result_done

    rec = state.read(state.marker(study.root, "probe", dataset, model))
    if not rec or rec.get("state") != "done" or not rec.get("results"):
        return False
    heads = rec.get("heads", []) if study.heads == ["all"] else study.heads
    return bool(heads) and all(result_done(Path(rec["results"]), h, study.protocol, study.seed_list) for h in heads)


# decoding and resizing one full-size JPEG on one CPU core, measured by benchmarks/bench_multi.py (13 ms)
DECODE_S = 0.013


def decode_seconds(dataset: str, cpus: int) -> float:
    """Estimated time for `cpus` CPUs to decode every image of the dataset once (one image when its size is
    unknown)."""
    from alfcache.datasets import dataset_size

    return max(1, sum(dataset_size(dataset).values())) * DECODE_S / max(1, cpus)


def decode_bound(estimates: dict, dataset: str, models: list[str], cpus: int) -> list[str]:
    """The models whose forward pass (the plan's estimate) is quicker than decoding the images on the task's
    CPUs: decoding limits them, so they gain from sharing one decode."""
    decode = decode_seconds(dataset, cpus)
    return [m for m in models if (e := estimates.get((dataset, m))) is not None and e["seconds"] < decode]


def cut(study: Study, models: list[str], datasets: list[str], models_per_task: int | None = 1,
        estimates: dict | None = None, cpus: int = 1) -> Tasks:
    """The tasks still to run, dataset by dataset. `models_per_task` models of a dataset share one task (and one
    decode of every image); None: the decode-bound models of a dataset (see `decode_bound`) share one task, the
    others get one each."""
    tasks = Tasks()
    for d in datasets:
        todo = []
        for m in models:
            if not extraction_done(study, d, m):
                todo.append(m)
            elif not probing_done(study, d, m):
                tasks.probe_only.append(Unit(d, (m,)))
            else:
                tasks.done.append((d, m))
        if models_per_task is None:
            shared = decode_bound(estimates or {}, d, todo, cpus)
            groups = ([tuple(shared)] if shared else []) + [(m,) for m in todo if m not in shared]
        else:
            groups = [tuple(todo[i:i + models_per_task]) for i in range(0, len(todo), models_per_task)]
        tasks.extract += [Unit(d, g) for g in groups]
    return tasks
