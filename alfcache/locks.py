"""One writer per store: a lock file beside the store naming its holder (pid, host, start time).

A lock left by a dead process on this host is stale and taken over with a warning; a lock from another host is
only taken over on request (--break-lock). A lock file that cannot be read is named as damaged.

On object storage the lock is an object created with put-if-absent (one conditional PUT: of several writers
starting at once exactly one creates it, on services that honour `If-None-Match`, as AWS S3 does). Its holder
rewrites it every ALF_LOCK_STALE_S / 5 seconds; a lock not rewritten for ALF_LOCK_STALE_S (default 300 s) is
stale - its holder died on some machine - and is taken over. Before recording each chunk the writer checks that
the lock still names it (`check_held`), so a writer that was silent past the stale time (and was replaced) stops
at its next chunk instead of writing on. Two writers of one store extract the same bytes for a chunk (the
resume keys fix everything a chunk depends on), so a chunk written twice in that window is the same chunk.
Not guaranteed: on a service that ignores conditional writes, two writers that start within one request of each
other can both believe they won until one's check before its first chunk.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from contextlib import contextmanager
import threading
import uuid
from pathlib import Path

from .errors import AlfError, os_error
from .format import is_remote, location

ENV_STALE = "ALF_LOCK_STALE_S"
_HELD: dict[str, str] = {}  # remote store -> the token of the lock this process holds on it

log = logging.getLogger(__name__)


def lock_path(store: Path) -> Path:
    return store.with_name(store.name + ".lock")


@contextmanager
def store_lock(path: Path, break_lock: bool = False):
    """Hold the exclusive writer lock of the store at `path` for the duration of the block."""
    if is_remote(path):
        with _remote_lock(location(path), break_lock):
            yield
        return
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


def _stale_after() -> float:
    return float(os.environ.get(ENV_STALE, "300"))


def _read_remote(lock) -> dict | None:
    try:
        holder = json.loads(lock.read_bytes())
    except FileNotFoundError:
        return {}
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and holder.get("token") else None


@contextmanager
def _remote_lock(path, break_lock: bool):
    from .remote import modified_age, put_if_absent

    lock = lock_path(path)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
          "token": uuid.uuid4().hex}
    body = json.dumps(me).encode()
    stale_s = _stale_after()
    for _ in range(3):
        if put_if_absent(lock, body) and (_read_remote(lock) or {}).get("token") == me["token"]:
            break
        holder, age = _read_remote(lock), modified_age(lock)
        if holder == {} or age is None:  # released between our two requests: try again
            continue
        same_host_dead = bool(holder) and holder.get("host") == me["host"] and not _pid_alive(holder.get("pid"))
        if holder is None and not break_lock and age < 5:
            raise AlfError(f"store '{path}' has a lock object '{lock}' that cannot be read; if no extraction is "
                           f"running, pass --break-lock")
        if holder is None or same_host_dead or age > stale_s or break_lock:
            why = ("unreadable" if holder is None else "stale" if same_host_dead or age > stale_s else "forcibly")
            log.warning("removing %s lock on %s (held by %s, last refreshed %.0f s ago)", why, path,
                        holder and f"pid {holder.get('pid')} on {holder.get('host')}", age)
            lock.unlink(missing_ok=True)
            continue
        raise AlfError(f"store '{path}' is being written by pid {holder.get('pid')} on {holder.get('host')} since "
                       f"{holder.get('since')} (its lock was refreshed {age:.0f} s ago; a lock left {stale_s:.0f} s "
                       f"without refresh is taken over); wait for it, or pass --break-lock if that process is gone")
    else:
        raise AlfError(f"could not take the lock '{lock}' (another writer keeps recreating it)")
    _HELD[str(path)] = me["token"]
    stop = threading.Event()

    def refresh():  # keep the lock young while we hold it; never rewrite someone else's
        while not stop.wait(stale_s / 5):
            try:
                if (_read_remote(lock) or {}).get("token") != me["token"]:
                    return
                lock.write_bytes(body)
            except Exception as e:  # noqa: BLE001 - a failed refresh is retried; check_held decides
                log.warning("could not refresh the lock %s: %s", lock, e)

    beat = threading.Thread(target=refresh, name="alf-lock-refresh", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        _HELD.pop(str(path), None)
        try:
            if (_read_remote(lock) or {}).get("token") == me["token"]:
                lock.unlink(missing_ok=True)
        except Exception as e:  # noqa: BLE001 - the lock goes stale by itself
            log.warning("could not release the lock %s: %s", lock, e)


def check_held(path) -> None:
    """Before a chunk is recorded: the lock of a remote store this process took must still name it."""
    token = _HELD.get(str(path))
    if token is None:
        return
    holder = _read_remote(lock_path(location(path)))
    if not holder or holder.get("token") != token:
        who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "nobody (it was removed)"
        raise AlfError(f"lost the lock of store '{path}': it now names {who}; stopping this writer (every chunk "
                       f"recorded so far is durable; the new writer resumes from them)")


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
