"""One writer per store: a lock file beside the store naming its holder (pid, host, start time).

A lock left by a dead process on this host is stale and taken over with a warning; a lock from another host is
only taken over on request (--break-lock). A lock file that cannot be read is named as damaged.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import AlfError, os_error

log = logging.getLogger(__name__)


def lock_path(store: Path) -> Path:
    return store.with_name(store.name + ".lock")


@contextmanager
def store_lock(path: Path, break_lock: bool = False):
    """Hold the exclusive writer lock of the store at `path` for the duration of the block."""
    lock = lock_path(path)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        err = os_error(lock.parent, e)
        if err is None:
            raise
        raise err from None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is None:  # unreadable: written by something else, or torn by a crash mid-write
                if not break_lock and _young(lock):
                    raise AlfError(f"store '{path}' has a lock file '{lock}' that cannot be read (being written "
                                   f"right now, or damaged); if no extraction is running, pass --break-lock")
                log.warning("removing unreadable lock file %s", lock)
                lock.unlink(missing_ok=True)
                continue
            stale = holder.get("host") == me["host"] and not _pid_alive(holder.get("pid"))
            if stale or break_lock:
                log.warning("removing %s lock on %s held by pid %s on %s since %s",
                            "stale" if stale else "forcibly", path, holder.get("pid"), holder.get("host"),
                            holder.get("since"))
                lock.unlink(missing_ok=True)
                continue
            raise AlfError(f"store '{path}' is being written by pid {holder.get('pid')} on {holder.get('host')} "
                           f"since {holder.get('since')}; wait for it, or pass --break-lock if that process is gone")
        except OSError as e:
            err = os_error(lock.parent, e)
            if err is None:
                raise
            raise err from None
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            break
    else:
        raise AlfError(f"could not take the lock '{lock}' (another writer keeps recreating it)")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _young(lock: Path, seconds: float = 5.0) -> bool:
    """A lock file written in the last few seconds may still be being filled in by its writer."""
    try:
        return time.time() - lock.stat().st_mtime < seconds
    except OSError:
        return False


def _read_lock(lock: Path) -> dict | None:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int) or not holder.get("host"):
        return None
    return holder


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _datasets_cache() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE)


@contextmanager
def dataset_lock(name: str, folder: Path | None = None):
    """One preparer per dataset at a time: tasks of a study that need the same dataset at once (one per model)
    queue here, so the first downloads it and builds the Hugging Face `datasets` cache and the others then read
    that cache - nobody downloads it twice or reads a half-built copy. An flock on a file in the datasets cache
    (shared by every task that shares the cache); the system releases it when its holder exits or dies."""
    import fcntl

    folder = Path(folder) if folder is not None else _datasets_cache()
    path = folder / "alfcache-locks" / (re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        err = os_error(path.parent, e)
        if err is None:
            raise
        raise err from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("dataset %s is being prepared by another task; waiting for it (%s)", name, path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
