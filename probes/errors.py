"""One-line user errors for the probe stage (arrays only; independent of alfcache)."""
from __future__ import annotations

import difflib


class ProbeError(Exception):
    """An error whose message is shown to the user as one line."""


def unknown_name(kind: str, name: str, choices) -> ProbeError:
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ProbeError(f"unknown {kind} '{name}'{hint} (known: {', '.join(choices)})")
