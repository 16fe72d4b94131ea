"""The study on a real Slurm (scripts/slurm.sh starts a one-node cluster; .ci/run does so before the tests):
job arrays through submitit, results equal to one process, a failing pair that fails alone with its log named,
a preempted task requeued and resumed, a cancelled one resubmitted by rerunning the command - stores the same
bytes as an uninterrupted run. Skipped where no Slurm runs, unless ALF_REQUIRE_SLURM=1 (CI), where that fails."""
import csv
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import run_alf, write_image_folder


def _slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return p.returncode == 0 and any(s in p.stdout for s in ("idle", "mix", "alloc"))


@pytest.fixture(scope="module")
def slurm():
    if not _slurm_up():
        if os.environ.get("ALF_REQUIRE_SLURM"):
            pytest.fail("ALF_REQUIRE_SLURM is set but no Slurm answers (scripts/slurm.sh start)")
        pytest.skip("no Slurm running here (scripts/slurm.sh start, as root)")


# one thread per task, the same in every process compared here (float sums depend on the thread count)
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
SLURM = ("--executor", "slurm", "--gpus", "0", "--cpus", "1", "--mem-gb", "2")


def _chunks(root: Path) -> dict[str, bytes]:
    """Every chunk file of every store under root (what the tokens and labels are; not the run's metadata)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "/c/" in str(p.relative_to(root)) and ".zarr" in str(p)}


def _results(root: Path) -> list[tuple]:
    rows = csv.DictReader(open(root / "results" / "summary.csv"))
    return sorted((r["dataset"], r["model"], r["head"], r["test_balanced_accuracy"], r["val_balanced_accuracy"],
                   r["lr"], r["wd"], r["dropout"]) for r in rows)


def _marker(root: Path, stage: str, dataset: str, model_dir: Path) -> dict:
    from alfstudy import state

    return state.read(state.marker(root, stage, dataset, f"local-dir:{model_dir}")) or {}


@pytest.mark.long
def test_study_on_slurm_equals_one_process_and_a_failing_pair_fails_alone(slurm, tmp_path):
    from alfcache.backbones import build_random_model

    a = build_random_model(tmp_path / "models" / "tiny-a", img_size=16, patch_size=4, embed_dim=32, depth=4,
                           num_heads=2, seed=0)
    b = build_random_model(tmp_path / "models" / "tiny-b", img_size=16, patch_size=4, embed_dim=48, depth=3,
                           num_heads=3, seed=1)
    bad = write_image_folder(tmp_path / "imgs")
    (bad / "train" / "dog" / "001.png").write_bytes(b"not an image")
    args = ("reproduce", "--models", f"local-dir:{a},local-dir:{b}", "--datasets", f"digits,imagefolder:{bad}",
            "--heads", "linear", "--grid", "quick", "--workers", "0", "--batch-size", "64")
    here = run_alf(*args, "--root", tmp_path / "here", env=ENV, timeout=600)
    there = run_alf(*args, "--root", tmp_path / "slurm", *SLURM, "--wait", env=ENV, timeout=600)
    for p in (here, there):  # the two pairs of the broken dataset fail; the run says so and exits non-zero
        assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
        assert "2 dataset x model pair(s) failed" in p.stderr and "Traceback" not in p.stderr
        assert f"imagefolder:{bad} x local-dir:{a}" in p.stderr and "alf status --root" in p.stderr
    # tiny models: decoding limits them, so each dataset's two models share one task (and one decode)
    assert "extraction: 2 task(s)" in there.stdout and "probes: 2 task(s)" in there.stdout
    # the same stores, byte for byte, and the same results
    same = _chunks(tmp_path / "here" / "features")
    assert len(same) >= 12 and same == _chunks(tmp_path / "slurm" / "features")
    rows = _results(tmp_path / "slurm")
    assert rows == _results(tmp_path / "here") and len(rows) == 2  # two probe tasks that ran side by side
    index = (tmp_path / "slurm" / "reports" / "index.md").read_text()
    assert "## Failed pairs" in index and f"imagefolder:{bad} x local-dir:{b}" in index
    # the failed pair names its error and its log file (which holds the error); its probe task never ran
    status = run_alf("status", "--root", tmp_path / "slurm", check=True).stdout
    rec = _marker(tmp_path / "slurm", "extract", f"imagefolder:{bad}", a)
    assert rec["state"] == "failed" and "dog/001.png" in rec["error"]
    assert Path(rec["log"]).is_file() and "dog/001.png" in Path(rec["log"]).read_text()
    assert rec["log"] in status and "blocked (extraction failed)" in status
    assert "extract: 2 done, 2 failed" in status and "probe: 2 blocked, 2 done" in status
    # rerun: nothing that is done is submitted again; only the two broken pairs
    again = run_alf(*args, "--root", tmp_path / "slurm", *SLURM, "--plan", env=ENV)
    assert "would submit: 1 extraction task(s), 1 probe task(s), 1 report job; 2 pair(s) already done" in again.stdout
    assert f"extract imagefolder:{bad} x local-dir:{a},local-dir:{b}:" in again.stdout


def _wait(cond, timeout: float, what: str, step: float = 0.3):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def _in_queue(job: str) -> bool:
    p = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True)
    return p.returncode == 0 and bool(p.stdout.strip())


@pytest.mark.long
def test_preempted_and_cancelled_extraction_resumes_to_the_same_stores(slurm, tmp_path):
    """A model slow enough (~20 s on one core, six chunks of train) to be interrupted twice mid-extraction: preempted (USR2, as Slurm
    signals before a time limit or preemption) it is requeued by submitit and resumes; then cancelled (scancel) it
    is gone, `alf status` says so, and rerunning the command submits only it, which resumes again. The stores are
    the bytes of an uninterrupted extraction."""
    from alfcache.backbones import build_random_model
    from alfcache.format import read_metadata

    m = build_random_model(tmp_path / "slow", img_size=64, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                           seed=3)
    run_alf("extract", "--model", f"local-dir:{m}", "--dataset", "digits", "--out", tmp_path / "ref", "--workers", "0",
            "--dtype", "float32", "--batch-size", "128", env=ENV, check=True, timeout=600)
    root = tmp_path / "study"
    env = dict(ENV, ALF_HEARTBEAT_S="1")
    args = ("reproduce", "--models", f"local-dir:{m}", "--datasets", "digits", "--heads", "linear", "--grid", "quick",
            "--workers", "0", "--root", root, *SLURM)
    run_alf(*args, env=env, check=True)
    train = root / "features" / "digits" / "local-slow" / "train.zarr"

    def chunks():
        return len(list((train / "cls" / "c").rglob("*"))) if (train / "cls" / "c").is_dir() else 0

    first = _marker(root, "extract", "digits", m)
    _wait(lambda: _marker(root, "extract", "digits", m).get("state") == "running" and chunks() >= 1, 300,
          "the first chunk")
    job = first["job"]
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # preemption / time limit
    pid = _marker(root, "extract", "digits", m)["pid"]
    rec = _wait(lambda: (r := _marker(root, "extract", "digits", m)).get("pid") not in (None, pid)
                and r.get("state") == "running" and r, 300, "the requeued task")
    assert rec["job"] == job  # the same task, requeued, not a new submission
    done_before = chunks()
    _wait(lambda: chunks() > done_before, 300, "a chunk after the requeue")
    subprocess.run(["scancel", job], check=True)  # cancelled: not requeued
    _wait(lambda: not _in_queue(job), 120, "the cancelled task to end")
    assert not read_metadata(train).get("complete")  # it stopped mid-extraction
    _wait(lambda: "lost (no heartbeat" in run_alf("status", "--root", root).stdout, 30, "status to say lost")
    log = Path(rec["log"]).read_text()
    assert "resuming" in log and "Requeued job" in log
    # rerun the same command: only what is missing is submitted, and it resumes
    p = run_alf(*args, "--wait", env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "extraction: 1 task(s)" in p.stdout
    ref = _chunks(tmp_path / "ref")
    got = _chunks(root / "features")
    assert len(ref) >= 10 and ref == got
    assert "extract: 1 done" in run_alf("status", "--root", root, check=True).stdout


def test_slurm_options_are_checked_and_a_refused_submission_is_one_line(tiny_model, tmp_path):
    from test_errors import one_line_error

    base = ("reproduce", "--models", f"local-dir:{tiny_model}", "--datasets", "digits", "--root", tmp_path)
    one_line_error(run_alf("status", "--root", tmp_path / "nothing"), "no study under", "alf reproduce --root")
    one_line_error(run_alf(*base, "--slurm", "partition=x"), "--slurm", "--executor slurm")
    one_line_error(run_alf(*base, "--executor", "slurm", "--slurm", "no-value"), "--slurm takes KEY=VALUE")
    one_line_error(run_alf(*base, "--executor", "slurm", "--models-per-task", "two"), "--models-per-task")
    if _slurm_up():  # sbatch's own refusal (an unknown partition), in one line, and nothing marked as submitted
        one_line_error(run_alf(*base, "--executor", "slurm", "--partition", "no-such-partition", "--gpus", "0"),
                       "Slurm refused the submission", "partition")
        assert not list((tmp_path / "study" / "state").rglob("*.json"))
