"""The study's view of result files: can results be written, is a head's result done, one line per result.
(Writing and reading one result file is `probes.results`; the summary tables are built from all of them.)"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from alfcache.errors import AlfError


def check_output(out: Path, need_bytes: int = 16 << 20) -> None:
    """Before any training: the results folder can be written and has room (a result costs a few MB)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".alf-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise AlfError(f"cannot write results to '{out}': {e.strerror or type(e).__name__} "
                       f"(choose another --out)") from None
    free = shutil.disk_usage(out).free
    if free < need_bytes:
        raise AlfError(f"only {free >> 20} MB free under '{out}', results need about {need_bytes >> 20} MB; "
                       f"free space or choose another --out")


def result_done(folder: Path, head: str, protocol: str, seeds: list[int]) -> bool:
    """Is this head's result for this protocol and these seeds on disk and readable? A damaged file is not."""
    from probes.results import _slug, read_result

    f = folder / f"{_slug(head)}.json"
    if not f.exists():
        return False
    rec = read_result(f)
    return (rec is not None and rec.get("protocol_name") == protocol
            and rec.get("seeds", [rec.get("seed")]) == list(seeds))


def result_line(rec: dict) -> str:
    from probes.results import fmt_spread

    c = rec["chosen"]
    n = rec.get("n_seeds", 1)
    acc = fmt_spread(rec["test_balanced_accuracy"], rec.get("test_balanced_accuracy_std"), n).replace(" (n=", "% (n=")
    acc = acc if n > 1 else acc + "%"
    chosen = f"lr={c['lr']:g} wd={c['wd']:g} dropout={c['dropout']:g}" + (" for seed " + str(rec["seeds"][0]) if n > 1 else "")
    return (f"{rec['dataset']} | {rec['model']} | {rec['head']}: test balanced acc {acc} "
            f"(val {rec['val_balanced_accuracy']:.2f}%, chance {rec.get('chance', float('nan')):.1f}%, {chosen}, "
            f"{rec['params']:,} params)")
