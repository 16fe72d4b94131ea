"""The work of one task, the same in this process and on a Slurm node: extract a dataset for its models, train a
pair's heads, build the report. Each task writes only its own files (its stores, its result files, its pairs'
markers); the summary and the report are built from all result files by the report task, so no row is lost when
tasks finish together. A task resumes where its files end: complete stores and finished heads are skipped."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from alfcache.errors import AlfError
from alfcache.format import StoreError
from probes.errors import ProbeError

from . import state
from .jobs import Echo, Study, Unit

log = logging.getLogger(__name__)
FAILURES = (AlfError, ProbeError, StoreError)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _offline(study: Study) -> None:
    if not study.online:  # compute nodes without internet: fail at once on anything not cached
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"


def _writer_gone(rec: dict | None) -> bool:
    """May this task take over a store lock left by the pair's previous task? Yes when that task was this very
    job before a requeue, or its heartbeat stopped (killed); the lock may then name another host."""
    if not rec or rec.get("state") != "running":
        return False
    job, _ = state.this_job()
    return state.stale(rec) or (job is not None and rec.get("job") == job)


def extract_task(study: Study, unit: Unit, echo: Echo = print) -> list[str]:
    """Extract the unit's dataset for its models (one decode for all of them); returns the pairs that failed."""
    from alfcache.extract import ExtractConfig, extract_many

    _offline(study)
    marks = [state.marker(study.root, "extract", unit.dataset, m) for m in unit.models]
    take_over = any(_writer_gone(state.read(p)) for p in marks)
    for p in marks:
        state.running(p)
    cfg = ExtractConfig(model=unit.models[0], dataset=unit.dataset, out=study.features, device=study.device,
                        workers=study.workers, batch_size=study.batch_size, dtype=study.dtype, break_lock=take_over,
                        protocol="clean" if study.protocol == "clean" else "paper")
    try:
        with state.heartbeat(marks):
            results = extract_many(cfg, list(unit.models), models_per_pass=None if len(unit.models) > 1 else 1)
    except FAILURES as e:
        for p in marks:
            state.write(p, state="failed", error=_one_line(e))
        echo(f"FAILED {unit.label} (extraction): {_one_line(e)}")
        return [f"{unit.dataset} x {m}" for m in unit.models]
    for m, p in zip(unit.models, marks):
        for r in results[m]:
            echo(f"{unit.dataset} x {m} {r.split}: {r.status}")
        state.write(p, state="done", stores=[str(r.path) for r in results[m]])
    return []


def probe_task(study: Study, unit: Unit, echo: Echo = print) -> list[str]:
    """Train the missing heads of each pair of the unit (finished heads are skipped, a damaged result is redone);
    returns the pairs that failed."""
    from alfcache.format import read_metadata
    from probes.features import FeatureSet
    from probes.heads import supported_heads
    from probes.results import result_dir
    from probes.runner import discover, run_heads

    from .results import result_done, result_line

    _offline(study)
    failed = []
    for m in unit.models:
        mark = state.marker(study.root, "probe", unit.dataset, m)
        ex = state.read(state.marker(study.root, "extract", unit.dataset, m))
        if not ex or ex.get("state") != "done":
            state.write(mark, state="failed", error="its extraction did not finish")
            failed.append(f"{unit.dataset} x {m}")
            continue
        state.running(mark)
        try:
            with state.heartbeat([mark]):
                meta = read_metadata(Path(ex["stores"][0]))
                heads, folder = [], None
                for pair in discover(study.features, dataset=meta["dataset"].get("slug") or meta["dataset"]["name"],
                                     model=meta["model"]["name"]):
                    wanted = supported_heads(FeatureSet.open(pair.train)) if study.heads == ["all"] else study.heads
                    folder = result_dir(study.results, pair.folder, pair.model)
                    todo = [h for h in wanted if not result_done(folder, h, study.protocol, study.seed_list)]
                    echo(f"{pair.dataset} x {pair.model}: {len(wanted) - len(todo)} of {len(wanted)} heads done"
                         + (f", running {', '.join(todo)}" if todo else ""))
                    if todo:
                        run_heads(pair, todo, study.protocol, study.results, seed=study.seed, seeds=study.seeds,
                                  device=study.device, on_result=lambda r: echo(result_line(r)))
                    heads = wanted
        except FAILURES as e:
            state.write(mark, state="failed", error=_one_line(e))
            echo(f"FAILED {unit.dataset} x {m} (probes): {_one_line(e)}")
            failed.append(f"{unit.dataset} x {m}")
            continue
        state.write(mark, state="done", heads=heads, results=str(folder))
    return failed


def report_task(study: Study, echo: Echo = print) -> Path:
    """The summary tables and the report, from every result file under the study's results; then the status."""
    from probes.results import write_summary

    from .report import build_report
    from .results import check_output
    from .status import write_status

    check_output(study.reports)
    _, _, rows = write_summary(study.results)
    index = build_report(study.features, study.results, study.reports, protocol="quick", seed=study.seed,
                         seeds=study.seeds, device=study.device, command=study.command)
    status, failed = write_status(study.root)
    if failed:  # the report says which pairs are missing from it, and how to get them
        text = index.read_text() + (
            f"\n## Failed pairs\n\n{len(failed)} dataset x model pair(s) failed and are not in these tables: "
            f"{', '.join(failed)}. Their errors and log files: [study status](../study/status.md). Fix the cause "
            f"and rerun `{study.command or 'alf reproduce'}`: only what is missing runs.\n")
        state.put(index, text.encode())
    echo(f"{len(rows)} results in {study.results}/ (summary.md), report {index}, status {status}")
    return index


class StudyTask:
    """One Slurm task (what submitit pickles and runs). On a time limit or preemption submitit calls
    `checkpoint`, which requeues the same call: it resumes at the first missing chunk or head. A task whose pairs
    failed raises, so Slurm records it as failed and its probe task is not started."""

    def __init__(self, stage: str, study: Study, unit: Unit | None = None):
        self.stage, self.study, self.unit = stage, study, unit

    def __call__(self) -> str:
        handler = logging.StreamHandler()  # our packages' progress notes into the task's log, with the time
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        for name in ("alfcache", "probes", "alfstudy"):
            logging.getLogger(name).setLevel(logging.INFO)
            logging.getLogger(name).addHandler(handler)
        echo = lambda text: print(text, flush=True)  # noqa: E731  (stdout is the task's log file)
        if self.stage == "report":
            return str(report_task(self.study, echo))
        run = extract_task if self.stage == "extract" else probe_task
        failed = run(self.study, self.unit, echo)
        if failed:
            raise AlfError(f"{self.stage} failed for {', '.join(failed)}")
        return f"{self.stage} {self.unit.label}: done"

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(StudyTask(self.stage, self.study, self.unit))
