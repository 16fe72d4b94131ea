"""Where the tasks run: `local` (one after another in this process) or `slurm` (job arrays through submitit).

On Slurm: one array of extraction tasks (one GPU each), one array of probe tasks whose task i starts when
extraction task i has succeeded (`aftercorr`; a failed extraction cancels its probe task), one array for pairs
whose stores are already complete, and a report job after all of them. Every task writes its own markers; the
submitting side writes `submitted` markers with each task's job id and log file, and `study/submission.json`.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from alfcache.errors import AlfError

from . import state
from .jobs import Echo, Study, Tasks, Unit
from .tasks import StudyTask, extract_task, probe_task, report_task



@dataclass
class Resources:
    """What one task asks Slurm for."""

    partition: str | None = None
    gpus: int = 0
    cpus: int = 8
    mem_gb: int | None = None
    time_min: int = 720
    account: str | None = None
    qos: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # any sbatch flag: --slurm KEY=VALUE

    def parameters(self) -> dict:
        p = {"time": self.time_min, "cpus_per_task": self.cpus, "ntasks_per_node": 1, "nodes": 1}
        for key, value in (("partition", self.partition), ("account", self.account), ("qos", self.qos)):
            if value:
                p[key] = value
        if self.gpus:
            p["gpus_per_node"] = self.gpus
        if self.mem_gb:
            p["mem"] = f"{self.mem_gb}G"
        return p


@dataclass
class SlurmOptions:
    extract: Resources
    probe: Resources
    parallel: int = 64  # tasks of one array running at once
    setup: list[str] = field(default_factory=list)  # shell lines run before each task (module load, activate)


def run_local(study: Study, tasks: Tasks, echo: Echo) -> list[str]:
    """Every task in this process, in order; a failing pair is reported and the rest goes on."""
    failed: list[str] = []
    for unit in tasks.extract:
        bad = extract_task(study, unit, echo)
        failed += bad
        ok = tuple(m for m in unit.models if f"{unit.dataset} x {m}" not in bad)
        if ok:
            failed += probe_task(study, Unit(unit.dataset, ok), echo)
    for unit in tasks.probe_only:
        failed += probe_task(study, unit, echo)
    index = study.reports / "index.md"
    if tasks.empty and index.is_file():  # nothing ran: the report of the last run stands
        echo(f"nothing to do; the report is up to date: {index}")
    else:
        report_task(study, echo)
    return failed


def _executor(folder: Path, res: Resources, opts: SlurmOptions, name: str, count: int, dependency: str | None):
    import submitit

    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=5)
    params = res.parameters()
    extra = dict(res.extra)
    if dependency:
        params["dependency"] = dependency
        extra.setdefault("kill-on-invalid-dep", "yes")  # a dependency that can never be met ends the task
    ex.update_parameters(job_name=name, array_parallelism=min(opts.parallel, max(count, 1)), setup=list(opts.setup),
                         stderr_to_stdout=True, additional_parameters=extra, **params)
    return ex


def _submit(ex, calls: list[StudyTask]) -> list:
    try:
        with ex.batch():
            jobs = [ex.submit(c) for c in calls]
    except Exception as e:  # sbatch refused (unknown partition, account, flag): its message, in one line
        text = " ".join(str(e).split())
        raise AlfError(f"Slurm refused the submission: {text[:400]}") from None
    return jobs


def _array(job) -> str:
    """The Slurm id of the array a task belongs to (a single job's own id)."""
    return job.job_id.split("_")[0]


def _after(jobs: list, kind: str) -> str:
    """`aftercorr:<array>` (task i after task i) for an array, `afterok:<id>` for a single job."""
    return f"{kind}:{_array(jobs[0])}" if "_" in jobs[0].job_id else f"afterok:{jobs[0].job_id}"


def submit_slurm(study: Study, tasks: Tasks, opts: SlurmOptions, echo: Echo) -> dict:
    """Submit the arrays and the report job; returns {stage: [job ids]} (also written to study/submission.json)."""
    logs = state.study_dir(study.root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    n_pairs = sum(len(u.models) for u in tasks.extract) + sum(len(u.models) for u in tasks.probe_only)
    submitted: dict[str, list] = {}
    if tasks.extract:
        ex = _executor(logs, opts.extract, opts, "alf-extract", len(tasks.extract), None)
        jobs = _submit(ex, [StudyTask("extract", study, u) for u in tasks.extract])
        submitted["extract"] = list(zip(tasks.extract, jobs))
        px = _executor(logs, opts.probe, opts, "alf-probe", len(tasks.extract), _after(jobs, "aftercorr"))
        submitted["probe"] = list(zip(tasks.extract, _submit(px, [StudyTask("probe", study, u) for u in tasks.extract])))
    if tasks.probe_only:
        px = _executor(logs, opts.probe, opts, "alf-probe", len(tasks.probe_only), None)
        submitted["probe"] = submitted.get("probe", []) + list(
            zip(tasks.probe_only, _submit(px, [StudyTask("probe", study, u) for u in tasks.probe_only])))
    all_ids = sorted({_array(j) for pairs in submitted.values() for _, j in pairs})
    rx = _executor(logs, Resources(**{**opts.probe.__dict__, "gpus": 0}), opts, "alf-report", 1,
                   "afterany:" + ":".join(all_ids))
    (report,) = _submit(rx, [StudyTask("report", study)])
    now = time.time()
    for stage, pairs in submitted.items():
        for unit, job in pairs:
            for m in unit.models:
                state.write(state.marker(study.root, stage, unit.dataset, m), state="submitted", job=job.job_id,
                            log=str(job.paths.stdout), submitted=now)
    record = {"submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "command": study.command,
              "jobs": {stage: sorted({_array(j) for _, j in pairs}) for stage, pairs in submitted.items()},
              "report": report.job_id, "report_log": str(report.paths.stdout),
              "tasks": {stage: len(pairs) for stage, pairs in submitted.items()}, "pairs": n_pairs}
    state.put(state.study_dir(study.root) / "submission.json", json.dumps(record, indent=1).encode())
    ne, npo = len(tasks.extract), len(tasks.probe_only)
    lines = []
    if ne:
        lines.append(f"  extraction: {ne} task(s), job {record['jobs']['extract'][0]}, "
                     f"{opts.extract.gpus} GPU(s) each, at most {min(opts.parallel, ne)} at a time")
        lines.append(f"  probes: {ne} task(s), job {_array(submitted['probe'][0][1])}, each after its extraction")
    if npo:
        lines.append(f"  probes of complete stores: {npo} task(s), job {_array(submitted['probe'][-1][1])}")
    lines.append(f"  report: job {report.job_id}, after all of them")
    echo(f"submitted {n_pairs} pair(s) to Slurm:\n" + "\n".join(lines)
         + f"\n  logs: {logs}/\nwatch with `alf status --root {shlex.quote(str(study.root))}`; rerun the same "
           f"command to submit only what is missing")
    return record


def wait_slurm(record: dict, poll_s: float = 2.0) -> None:
    """Until none of the submission's jobs is queued or running, asked of `squeue` (the controller, not the
    accounting database)."""
    ids = sorted({i for ids in record["jobs"].values() for i in ids} | {record["report"]})
    while True:
        try:
            out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True, text=True,
                                 timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise AlfError(f"cannot ask Slurm about the jobs ({e}); follow them with `alf status`") from None
        if (out.returncode == 0 and not out.stdout.strip()) or "Invalid job id" in out.stderr:
            return  # none left (ids that ended long ago are unknown to the controller)
        time.sleep(poll_s)
