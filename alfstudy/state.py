"""Each task's small durable marker: `<root>/study/state/<stage>/<dataset>/<model>.json`, one per pair and stage,
written atomically (temporary file + rename) by the task that owns the pair, never by anyone else.

A marker says `submitted` (job id, log file), `running` (host, pid, a heartbeat refreshed while the task lives),
`done` (the stores or the heads and result folder it made) or `failed` (the error line, the log). The study's
status is read from these and from the stores and result files themselves - never from the scheduler's accounting.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from alfcache.format import write_atomic
from probes.results import _slug

STAGES = ("extract", "probe")
HEARTBEAT_S = float(os.environ.get("ALF_HEARTBEAT_S", "60"))  # a running task refreshes its markers this often


def study_dir(root: Path) -> Path:
    return Path(root) / "study"


def marker(root: Path, stage: str, dataset: str, model: str) -> Path:
    return study_dir(root) / "state" / stage / _slug(dataset) / f"{_slug(model)}.json"


def put(path: Path, data: bytes) -> None:
    """Atomically (temporary file + rename), creating the folder first."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(path), data)


def read(path: Path) -> dict | None:
    """A marker, or None when there is none (or it cannot be read: then the pair counts as not done)."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def write(path: Path, **fields) -> dict:
    """Replace the marker with `fields` (plus the time); job id and log are kept from the previous marker unless
    given, so a requeued task still names its log."""
    old = read(path) or {}
    rec = {k: old[k] for k in ("job", "log", "submitted") if k in old}
    rec.update(fields)
    _save(path, rec)
    return rec


def _save(path: Path, rec: dict) -> None:
    rec["updated"] = time.time()
    put(path, json.dumps(rec, indent=1, default=str).encode())


def this_job() -> tuple[str | None, str | None]:
    """(job id, log file) of the Slurm task this process runs in, None outside one."""
    try:
        import submitit

        env = submitit.JobEnvironment()
        return env.job_id, str(env.paths.stdout).replace("%t", "0")
    except Exception:  # not inside a submitit job
        jid = os.environ.get("SLURM_JOB_ID")
        return jid, None


def running(path: Path, **fields) -> dict:
    job, log = this_job()
    extra = {"job": job} if job else {}
    if log:
        extra["log"] = log
    return write(path, state="running", host=socket.gethostname(), pid=os.getpid(), started=time.time(),
                 heartbeat_s=HEARTBEAT_S, **extra, **fields)


@contextmanager
def heartbeat(paths: list[Path], every: float | None = None):
    """While the block runs, refresh `updated` in these markers (only while they still say running), so `alf
    status` can tell a live task from one that was killed without a word."""
    every = HEARTBEAT_S if every is None else every
    stop = threading.Event()

    def beat():
        while not stop.wait(every):
            for p in paths:
                rec = read(p)
                if rec and rec.get("state") == "running" and rec.get("pid") == os.getpid():
                    try:
                        _save(p, rec)
                    except OSError:
                        pass

    t = threading.Thread(target=beat, name="alf-heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)


def stale(rec: dict, now: float | None = None) -> bool:
    """A `running` marker whose heartbeat stopped: its task was killed (scancel, node failure, out of memory)."""
    every = float(rec.get("heartbeat_s", HEARTBEAT_S))  # the interval the task itself used
    return rec.get("state") == "running" and (now or time.time()) - float(rec.get("updated", 0)) > 3 * every
