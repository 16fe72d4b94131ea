"""Shared helpers for the benchmark scripts: machine description, timing, resident memory, result lines."""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(os.environ.get("ALF_BENCH_OUT", ROOT / "benchmarks" / "results"))


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, "
            f"python {platform.python_version()}, torch {torch.__version__}")


@contextmanager
def timer(out: dict, key: str):
    t = time.perf_counter()
    yield
    out[key] = time.perf_counter() - t


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(name: str, rows: list[tuple[str, str, str]], facts: dict) -> None:
    """Print `metric | value | target` lines and save them (JSON) under benchmarks/results/."""
    print(f"\n## {name}  ({machine()})")
    w = max(len(r[0]) for r in rows)
    for metric, value, target in rows:
        print(f"  {metric.ljust(w)}  {value:>14}   {target}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine(), "rows": rows, "facts": facts}, indent=2,
                                                     default=str))
