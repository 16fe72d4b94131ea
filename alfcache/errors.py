"""User-facing errors: one clear line, non-zero exit, no traceback."""
from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable
from pathlib import Path


class AlfError(Exception):
    """An error whose message is shown to the user as one line."""


def unknown_name(kind: str, name: str, choices: Iterable[str], hint: str = "") -> AlfError:
    """An 'unknown X' error with close-match suggestions."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    shown = name if len(name) <= 80 else name[:77] + "..."
    msg = f"unknown {kind} '{shown}'"
    if close:
        msg += f"; did you mean {', '.join(repr(c) for c in close)}?"
    msg += f" (known: {', '.join(choices)}"
    msg += f"; {hint})" if hint else ")"
    return AlfError(msg)


def disk_full_error(path: Path, detail: str) -> AlfError:
    return AlfError(f"disk full while writing '{path}' ({detail}); the store is valid up to the last "
                    f"durable chunk - free space and rerun the same command to resume")


def os_error(path: Path, e: OSError) -> AlfError | None:
    """The one-line error for an OS-level write failure, or None if it is not one we explain."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full_error(path, e.strerror or "no space left")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return AlfError(f"cannot write to '{e.filename or path}': {e.strerror} (choose another --out)")
    return None
