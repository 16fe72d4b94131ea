"""`alf status`: the study in one table - per pair and stage planned / queued / running / done / failed - read
from the tool's own durable files (the plan, each task's marker, the stores' `complete` flag, the result files),
never from the scheduler's accounting (many clusters throttle `sacct`, small ones have none)."""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from alfcache.errors import AlfError

from . import state
from .jobs import Study, extraction_done, probing_done


def read_plan(root: Path) -> dict:
    f = state.study_dir(root) / "plan.json"
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise AlfError(f"no study under '{root}' (no {f}); start one with `alf reproduce --root {root}`") from None
    except (OSError, ValueError) as e:
        raise AlfError(f"the study plan '{f}' cannot be read ({e}); rerun `alf reproduce` to rewrite it") from None


def write_plan(study: Study, models: list[str], datasets: list[str], skipped: list[str]) -> None:
    rec = {"models": models, "datasets": datasets, "skipped": skipped,
           "study": {k: (str(v) if isinstance(v, Path) else v) for k, v in study.__dict__.items()}}
    state.put(state.study_dir(study.root) / "plan.json", json.dumps(rec, indent=1).encode())


def _age(t: float, now: float) -> str:
    s = max(0, now - t)
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h")


def _stage(study: Study, stage: str, dataset: str, model: str, now: float) -> tuple[str, dict]:
    rec = state.read(state.marker(study.root, stage, dataset, model)) or {}
    s = rec.get("state")
    if s == "done":
        ok = (extraction_done if stage == "extract" else probing_done)(study, dataset, model)
        return ("done" if ok else "redo (files missing)"), rec
    if s == "running":
        if state.stale(rec, now):
            return f"lost (no heartbeat for {_age(rec.get('updated', 0), now)})", rec
        return f"running ({_age(rec.get('started', now), now)})", rec
    if s == "submitted":
        return "queued", rec
    if s == "failed":
        return "failed", rec
    done = (extraction_done if stage == "extract" else probing_done)(study, dataset, model)
    return ("done" if done else "planned"), rec


def rows(root: Path, plan: dict | None = None) -> list[dict]:
    """One row per planned pair: each stage's state, the job, log and error to show."""
    plan = plan or read_plan(root)
    study = Study(**{**plan["study"], "root": Path(root)})
    now = time.time()
    out = []
    for d in plan["datasets"]:
        for m in plan["models"]:
            ex, erec = _stage(study, "extract", d, m, now)
            pr, prec = _stage(study, "probe", d, m, now)
            if ex == "failed" and pr in ("queued", "planned", "failed"):
                pr, prec = "blocked (extraction failed)", {}
            live = prec if pr.split()[0] in ("running", "queued", "failed", "lost") else erec
            out.append({"dataset": d, "model": m, "extract": ex, "probe": pr, "job": live.get("job", ""),
                        "log": live.get("log", "") if live.get("state") in ("running", "failed", "submitted") else "",
                        "error": live.get("error", "")})
    return out


def table(root: Path, plan: dict | None = None, rs: list[dict] | None = None) -> str:
    plan = plan or read_plan(root)
    rs = rows(root, plan) if rs is None else rs
    lines = [f"study under {root}: {len(plan['datasets'])} dataset(s) x {len(plan['models'])} model(s)"
             + (f"; not reachable, not submitted: {', '.join(plan['skipped'])}" if plan.get("skipped") else "")]
    for stage in ("extract", "probe"):
        c = Counter(r[stage].split()[0] for r in rs)
        lines.append(f"{stage}: " + ", ".join(f"{n} {k}" for k, n in sorted(c.items())))
    lines += ["", "| dataset | model | extract | probe | job | log / error |", "|---|---|---|---|---|---|"]
    for r in rs:
        note = r["error"] + (f" (log: {r['log']})" if r["error"] and r["log"] else "") if r["error"] else r["log"]
        lines.append(f"| {r['dataset']} | {r['model']} | {r['extract']} | {r['probe']} | {r['job']} | {note} |")
    return "\n".join(lines) + "\n"


def failed_pairs(rs: list[dict]) -> list[str]:
    return [f"{r['dataset']} x {r['model']}" for r in rs
            if r["extract"].split()[0] in ("failed", "lost") or r["probe"].split()[0] in ("failed", "lost", "blocked")]


def write_status(root: Path) -> tuple[Path, list[str]]:
    """status.md from one reading of the study; returns it and the failed pairs."""
    plan = read_plan(root)
    rs = rows(root, plan)
    f = state.study_dir(root) / "status.md"
    state.put(f, table(root, plan, rs).encode())
    return f, failed_pairs(rs)
