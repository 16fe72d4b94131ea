"""The full study (9 models x 19 datasets) on Slurm: `--plan` prints every task with estimates in under 10 s;
submitting it (171 extraction tasks, 171 probe tasks, a report; offline with an empty cache, so every task fails
fast) takes under 30 s; then how long the arrays take to fail through, and that each failure is one line.
Needs a running Slurm (scripts/slurm.sh start). `--no-drain` cancels the jobs right after submitting."""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, report


def alf(args, env):
    t = time.perf_counter()
    p = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, env=env)
    return time.perf_counter() - t, p


def main(drain: bool = True):
    rows, facts = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=f"{tmp}/hf", ALF_DATASETS_DIR="", ALF_LOG=f"{tmp}/alf.log",
                   OMP_NUM_THREADS="1")
        base = ["reproduce", "--root", f"{tmp}/study", "--executor", "slurm", "--include-unreachable", "--gpus", "0",
                "--cpus", "1", "--mem-gb", "1", "--models-per-task", "1"]
        secs, p = alf(base + ["--plan"], env)
        tasks = sum(1 for line in p.stdout.splitlines() if line.startswith("  extract "))
        facts["plan"] = {"seconds": secs, "exit": p.returncode, "extraction_tasks_listed": tasks}
        rows.append(("--plan, full study", f"{secs:.2f} s", f"target < 10 s; {tasks} tasks listed, exit {p.returncode}"))
        secs, p = alf(base, env)
        rec = json.loads((Path(tmp) / "study" / "study" / "submission.json").read_text()) if p.returncode == 0 else {}
        facts["submit"] = {"seconds": secs, "exit": p.returncode, "record": rec, "stderr": p.stderr[-500:]}
        rows.append(("submit, full study", f"{secs:.2f} s", f"target < 30 s; tasks {rec.get('tasks')}, exit "
                                                             f"{p.returncode}"))
        ids = sorted({i for v in rec.get("jobs", {}).values() for i in v} | ({rec["report"]} if rec else set()))
        if ids and drain:  # every task fails fast on the missing weights; the report job runs last
            t = time.perf_counter()
            while subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True, text=True).stdout.strip():
                time.sleep(2)
            drained = time.perf_counter() - t
            st = subprocess.run([sys.executable, str(ROOT / "cli.py"), "status", "--root", f"{tmp}/study"],
                                capture_output=True, text=True, env=env).stdout
            failed = st.count("| failed |")
            logs = list((Path(tmp) / "study" / "study" / "logs").glob("*_log.out"))
            facts["drain"] = {"seconds": drained, "failed_extractions": failed, "logs": len(logs),
                              "status_head": st.splitlines()[:3]}
            rows.append(("171 failing tasks through 2 cores", f"{drained:.0f} s",
                         f"{failed} extraction(s) failed with one error line each; status: {st.splitlines()[1]}; "
                         f"{st.splitlines()[2]}"))
        elif ids:
            subprocess.run(["scancel", *ids])
    report("study_submit", rows, facts)


if __name__ == "__main__":
    main(drain="--no-drain" not in sys.argv)
