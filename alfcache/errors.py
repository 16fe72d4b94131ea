"""User-facing errors: one clear line, non-zero exit, no traceback."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class AlfError(Exception):
    """An error whose message is shown to the user as one line."""


def unknown_name(kind: str, name: str, choices: Iterable[str], hint: str = "") -> AlfError:
    """An 'unknown X' error with close-match suggestions."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    msg = f"unknown {kind} '{name}'"
    if close:
        msg += f"; did you mean {', '.join(repr(c) for c in close)}?"
    msg += f" (known: {', '.join(choices)}"
    msg += f"; {hint})" if hint else ")"
    return AlfError(msg)
