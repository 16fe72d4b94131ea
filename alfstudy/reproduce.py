"""`alf reproduce`: plan -> tasks (what is done dropped) -> run here or submit to Slurm -> report and status.

A pair that cannot be reached (weights or data neither cached nor downloadable where the tasks run) is not run
and the `alf fetch` command that fixes it is printed. A failing pair is reported and the rest goes on; the run
then ends in an error naming the failed pairs and the command that redoes them (the same command)."""
from __future__ import annotations

import os
from pathlib import Path

from alfcache.errors import AlfError

from .executors import SlurmOptions, run_local, submit_slurm, wait_slurm
from .jobs import Echo, Study, Tasks, cut
from .plan import Plan, nothing_to_run, plan_study, what_it_needs
from .results import check_output
from .status import failed_pairs, read_plan, rows, table, write_plan



def _stderr(text: str) -> None:
    import sys

    print(text, file=sys.stderr)


def _plan_lines(plan: Plan, tasks: Tasks, slurm: SlurmOptions | None, cpus: int) -> list[str]:
    """`--plan`: the tasks it would run or submit, with the estimated device time and disk of every extraction
    task. A task's time is its models' forward time or the time its CPUs take to decode the images, whichever
    is longer (they overlap); models sharing a decode pay for it once."""
    from alfcache.plan import human_bytes, human_seconds

    from .jobs import DECODE_S, decode_seconds

    gpus = slurm.extract.gpus if slurm else (1 if plan.device == "cuda" else 0)
    unit = "GPU" if gpus else "CPU"
    n_extract, n_probe = len(tasks.extract), len(tasks.extract) + len(tasks.probe_only)
    lines = [f"would {'submit' if slurm else 'run'}: {n_extract} extraction task(s), {n_probe} probe task(s), "
             f"1 report job; {len(tasks.done)} pair(s) already done"]
    tot_s = tot_b = alone_s = 0.0
    for u in tasks.extract:
        est = [plan.estimates.get((u.dataset, m)) for m in u.models]
        if any(e is None for e in est):
            lines.append(f"  extract {u.label}: no estimate")
            continue
        decode = decode_seconds(u.dataset, cpus)
        secs = max(sum(e["seconds"] for e in est), decode) * max(gpus, 1)
        alone_s += sum(max(e["seconds"], decode) for e in est) * max(gpus, 1)
        disk = sum(e["bytes"] for e in est)
        tot_s, tot_b = tot_s + secs, tot_b + disk
        lines.append(f"  extract {u.label}: ~{human_seconds(secs)} {unit} time, {human_bytes(disk)}")
    shared = [u for u in tasks.extract if len(u.models) > 1]
    if shared:
        lines.append(f"  {len(shared)} extraction task(s) run several models over one decode of each image: "
                     f"decoding limits them (their forward per image is quicker than decoding it on {cpus} CPU(s)); "
                     f"~{human_seconds(alone_s)} with one task per model. --models-per-task 1 gives each its own")
    for u in tasks.probe_only:
        lines.append(f"  probe {u.label} (stores complete)")
    lines.append(f"total extraction: ~{tot_s / 3600:.1f} {unit} h, {human_bytes(tot_b)} of stores (estimates: "
                 f"forward FLOPs at a nominal throughput, or decoding at {DECODE_S * 1000:.0f} ms per image per CPU)")
    return lines


def reproduce(models: list[str], datasets: list[str], heads: list[str], *, root: Path, protocol: str = "paper",
              device: str = "auto", workers: int = 2, batch_size: int = 128, dtype: str = "float32",
              seed: int = 0, seeds: int = 1, command: str = "", executor: str = "local",
              slurm: SlurmOptions | None = None, plan_only: bool = False, wait: bool = False,
              models_per_task: int | None = None, nodes_online: bool = False, include_unreachable: bool = False,
              echo: Echo = print, echo_err: Echo = _stderr) -> Path | None:
    """The whole study; returns the report index (local), None when submitted or only planned."""
    on_slurm = executor == "slurm"
    # Slurm: the compute nodes may have no internet, so only what is cached counts (unless told otherwise)
    online = None if not on_slurm else nodes_online
    est_device = device if not on_slurm else ("cuda" if slurm.extract.gpus else "cpu")
    plan = plan_study(models, datasets, est_device, online=online, dtype=dtype, plan_all=include_unreachable)
    for line in plan.lines:
        echo(line)
    run_models, run_datasets = (models, datasets) if include_unreachable else (plan.models, plan.datasets)
    if not run_models or not run_datasets:
        raise AlfError(nothing_to_run(plan))
    study = Study(root=Path(root), heads=heads, protocol=protocol, seed=seed, seeds=seeds, device=device,
                  workers=workers, batch_size=batch_size, dtype=dtype, command=command,
                  online=plan.online or include_unreachable)
    cpus = slurm.extract.cpus if on_slurm else (os.cpu_count() or 1)
    tasks = cut(study, run_models, run_datasets, models_per_task, plan.estimates, cpus)
    skipped = [] if include_unreachable else plan.missing_models + plan.missing_datasets
    if plan_only:
        for line in _plan_lines(plan, tasks, slurm, cpus):
            echo(line)
        echo("(--plan: nothing submitted)")
        return None
    if skipped:
        echo_err(f"not run (not reachable{' from the compute nodes' if on_slurm else ''}): {', '.join(skipped)}; "
                 f"fix with {what_it_needs(plan)} where there is internet, then rerun")
    check_output(study.results)
    write_plan(study, run_models, run_datasets, skipped)
    if on_slurm:
        if tasks.empty:
            echo(f"nothing to submit: all {len(tasks.done)} pair(s) are done")
            echo(table(study.root))
            return None
        record = submit_slurm(study, tasks, slurm, echo)
        if not wait:
            return None
        echo("waiting for the jobs (Ctrl-C stops waiting, not the jobs)")
        wait_slurm(record)
        _never_started(study, run_models, run_datasets)
        plan_rec = read_plan(study.root)
        rs = rows(study.root, plan_rec)
        echo(table(study.root, plan_rec, rs))
        _raise_if_failed(study, command, rs)
        return study.reports / "index.md"
    trained = [0]

    def out(text: str) -> None:
        if text.startswith("FAILED"):
            echo_err(text)
            return
        trained[0] += ": test balanced acc" in text
        echo(text)

    run_local(study, tasks, out)
    echo(f"done: {trained[0]} heads trained now; {len(tasks.done)} of "
         f"{len(run_models) * len(run_datasets)} pair(s) were already done")
    _raise_if_failed(study, command)
    return study.reports / "index.md"


def _never_started(study: Study, models: list[str], datasets: list[str]) -> None:
    """After the queue is empty: a marker still saying `submitted` belongs to a task that ended before its work
    began (it could not start Python, import alfcache, or was cancelled while pending); it is a failure."""
    from . import state

    for stage in state.STAGES:
        for d in datasets:
            for m in models:
                path = state.marker(study.root, stage, d, m)
                rec = state.read(path)
                if rec and rec.get("state") == "submitted":
                    state.write(path, state="failed", error="the task ended before its work began (see its log)")


def _raise_if_failed(study: Study, command: str, rs: list[dict] | None = None) -> None:
    failed = failed_pairs(rows(study.root) if rs is None else rs)
    if failed:
        raise AlfError(f"{len(failed)} dataset x model pair(s) failed: {', '.join(failed)} (see `alf status --root "
                       f"{study.root}` for errors and logs); fix the cause and rerun "
                       f"{'`' + command + '`' if command else 'the same command'} to do only what is missing")
