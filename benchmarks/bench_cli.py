"""CLI start-up and offline failure times: `alf --help` and the listing commands import nothing heavy; without
network and with an empty Hugging Face cache, extraction fails in one line within seconds. Targets: --help
under 2 s, offline failures under 20 s (on an idle 2-core machine)."""
import os
import subprocess
import sys
import tempfile
import time

from common import ROOT, report

CASES = [
    ("alf --help", ["--help"], 2.0),
    ("alf models", ["models"], 2.0),
    ("alf datasets", ["datasets"], 2.0),
    ("alf ls (empty root)", ["ls", "{tmp}/none"], 2.0),
    ("offline: extract clip-l x digits", ["extract", "--model", "clip-l", "--dataset", "digits", "--out", "{tmp}/f"], 20.0),
    ("offline: extract vit-s x fer2013", ["extract", "--model", "vit-s", "--dataset", "fer2013", "--out", "{tmp}/f"], 20.0),
    ("offline: extract clip-l x fer2013", ["extract", "--model", "clip-l", "--dataset", "fer2013", "--out", "{tmp}/f"], 20.0),
]


def main(repeats: int = 3):
    rows, facts = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=f"{tmp}/empty-cache", ALF_DATASETS_DIR="",
                   ALF_LOG=f"{tmp}/alf.log")
        for label, args, target in CASES:
            best, err = float("inf"), ""
            for _ in range(repeats):
                t = time.perf_counter()
                p = subprocess.run([sys.executable, str(ROOT / "cli.py"), *[a.format(tmp=tmp) for a in args]],
                                   capture_output=True, text=True, env=env)
                best = min(best, time.perf_counter() - t)
                err = p.stderr.strip()
            lines = len(err.splitlines()) if err else 0
            facts[label] = {"seconds": best, "exit": p.returncode, "stderr_lines": lines}
            rows.append((label, f"{best:.2f} s", f"target < {target:g} s; exit {p.returncode}, {lines} stderr line(s)"))
    report("cli", rows, facts)


if __name__ == "__main__":
    main()
