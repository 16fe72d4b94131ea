"""torch.distributed extraction on CPU (gloo, 2 processes): disjoint chunks, one store, identical to one process."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from probes import FeatureSet
from probes.features import verify_store


def free_port() -> int:
    """A port no other test (or pytest-xdist worker) holds right now, for torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, port, env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           str(ROOT / "cli.py"), "extract", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
@pytest.mark.long
def test_two_ranks_equal_one_process_and_resume(tiny_model, tmp_path, fmt):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    base = ["--model", str(tiny_model), "--dataset", "digits", "--split", "train", "--workers", "0",
            "--chunk-rows", "64", "--batch-size", "8", "--format", fmt]
    single = subprocess.run([sys.executable, str(ROOT / "cli.py"), "extract", *base, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr
    port = free_port()
    p = _torchrun(base + ["--out", str(tmp_path / "two")], port, env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "rank 1/2" in p.stderr and "rank 0/2" in p.stderr
    rel = f"digits/local-tiny/train.{fmt}"
    a, b = FeatureSet.open(tmp_path / "two" / rel), FeatureSet.open(tmp_path / "one" / rel)
    for name in ("cls", "ap"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)[:]), np.asarray(getattr(b, name)[:]))
    assert a.meta["chunk_checksums"] == b.meta["chunk_checksums"] and verify_store(tmp_path / "two" / rel) == 22
    assert not list((tmp_path / "two").rglob("alf_progress*")) and not list((tmp_path / "two").rglob("*.lock"))

    # a single-process run killed part-way is resumed by two ranks, which share the remaining chunks
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "extract", *base, "--out", str(tmp_path / "k")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = tmp_path / "k" / (rel if fmt == "zarr" else rel + ".partial")
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        try:
            if len(json.loads((staged / "alf_progress.json").read_text())["done"]) >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    if proc.poll() is not None:
        pytest.skip("extraction finished before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    p = _torchrun(base + ["--out", str(tmp_path / "k")], free_port(), env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed" in p.stdout
    c = FeatureSet.open(tmp_path / "k" / rel)
    np.testing.assert_array_equal(np.asarray(c.ap[:]), np.asarray(b.ap[:]))
    assert c.meta["chunk_checksums"] == b.meta["chunk_checksums"]


@pytest.mark.long
def test_probe_grid_spread_over_two_ranks_equals_one_process(digits_stores, tmp_path):
    """`alf probe --distributed` under torchrun: each rank trains half of the grid, scores are gathered, the
    same configuration wins and only rank 0 writes. Every configuration sees the same batches, noise and draws
    as in the one-process run; its score equals that run's up to floating-point rounding (a rank's batched
    matrices have other shapes), which training at lr 0.1 can amplify by a few validation images (measured: up to
    8 of ~270 with one thread per process); at lr 0.01 the scores are equal."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    root = digits_stores["train"].parents[2]
    base = ["probe", "--head", "linear,alf", "--grid", "quick", "--store-root", str(root), "--no-verify"]
    one = subprocess.run([sys.executable, str(ROOT / "cli.py"), *base, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), str(ROOT / "cli.py"), *base, "--distributed", "--out", str(tmp_path / "two")]
    two = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert "[rank 0/2: 2]" in two.stderr and "[rank 1/2: 2]" in two.stderr  # the quick linear grid is 4 configs
    assert two.stdout.count(": test balanced acc") == 2  # rank 0 reports each head once; rank 1 only trains
    assert two.stdout.count("# Probe results") == 1  # and prints the summary table once
    for head in ("linear", "alf"):
        a, b = (json.loads(next((tmp_path / d).rglob(f"{head}.json")).read_text()) for d in ("one", "two"))
        assert b["ranks"] == 2 and a["ranks"] == 1
        assert b["chosen"] == a["chosen"]
        va, vb = (np.array([r["val_balanced_accuracy"] for r in x["grid_results"]]) for x in (a, b))
        fast = np.array([r["lr"] >= 0.1 for r in a["grid_results"]])
        assert [r["lr"] for r in a["grid_results"]] == [r["lr"] for r in b["grid_results"]]
        assert (np.abs(va - vb)[~fast] < 1e-6).all(), (va, vb)  # rounding does not move these scores
        assert (np.abs(va - vb)[fast] < 5.0).all(), (va, vb)  # at lr 0.1: a few of ~270 validation images
        assert abs(b["test_balanced_accuracy"] - a["test_balanced_accuracy"]) < 1e-6  # the winner retrained alike
    assert len(list((tmp_path / "two").rglob("*.json"))) == len(list((tmp_path / "one").rglob("*.json")))
