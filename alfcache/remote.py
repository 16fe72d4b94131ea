"""The writer's side of stores on object storage: put-if-absent (the lock), object age, deleting a store, and the
write test before an extraction. Locations, listings, reading, one-line errors: `format.py` (object storage)."""
from __future__ import annotations

import os
import shutil

from .format import explain, is_remote, location


def _fs_and_key(path):
    p = location(path)
    return p.fs, p.path


def put_if_absent(path, data: bytes) -> bool:
    """Create the object only if it does not exist (one conditional PUT). False: it exists."""
    fs, key = _fs_and_key(path)
    try:
        fs.pipe_file(key, data, mode="create")
    except FileExistsError:
        return False
    return True


def modified_age(path) -> float | None:
    """Seconds since the object was last written, by the service's clock as seen from here; None if absent."""
    import datetime

    fs, key = _fs_and_key(path)
    try:
        info = fs.info(key)
    except FileNotFoundError:
        return None
    stamp = info.get("LastModified") or info.get("mtime")
    if stamp is None:
        return None
    if not isinstance(stamp, datetime.datetime):
        stamp = datetime.datetime.fromtimestamp(float(stamp), datetime.timezone.utc)
    return (datetime.datetime.now(datetime.timezone.utc) - stamp).total_seconds()


def remove_tree(path) -> None:
    """Delete a store (every object under its prefix) or a local folder/file."""
    p = location(path)
    if not is_remote(p):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        return
    fs, key = p.fs, p.path
    try:
        fs.rm(key, recursive=True)
    except FileNotFoundError:
        pass


def check_writable(root) -> None:
    """Write and delete one test object under root: missing credentials, a missing bucket or a bucket the
    credentials may not write are named in one line before any work starts."""
    from .errors import AlfError

    p = location(root) / f".alf-write-test-{os.getpid()}"
    try:
        p.write_bytes(b"ok")
        p.unlink()
    except Exception as e:
        msg = explain(e, path=root)
        if msg is None:
            raise
        raise AlfError(f"cannot write to '{root}': {msg}") from None
