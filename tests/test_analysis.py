"""CKA properties, per-layer sweep, heatmaps, report files and `make reproduce-mini` end to end."""
import csv
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from alfstudy.cka import cka


def direct_debiased_cka(X, Y):
    """Song et al.'s unbiased HSIC written out term by term in numpy, then CKA."""
    def hsic(K, L):
        n = K.shape[0]
        K, L = K.copy(), L.copy()
        np.fill_diagonal(K, 0)
        np.fill_diagonal(L, 0)
        one = np.ones(n)
        t1 = np.trace(K @ L)
        t2 = (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
        t3 = 2.0 / (n - 2) * (one @ K @ L @ one)
        return (t1 + t2 - t3) / (n * (n - 3))
    K, L = X @ X.T, Y @ Y.T
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


@pytest.fixture
def xy():
    rng = np.random.default_rng(0)
    return rng.standard_normal((60, 20)), rng.standard_normal((60, 15))


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cka_self_is_one_and_invariant(xy, kernel):
    X, _ = xy
    assert cka(X, X, kernel=kernel) == pytest.approx(1.0, abs=1e-9)
    Q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((20, 20)))
    Y = 3.7 * X @ Q  # orthogonal transform + isotropic scaling
    assert cka(X, Y, kernel=kernel) == pytest.approx(1.0, abs=1e-6)


def test_cka_equals_direct_formula(xy):
    X, Y = xy
    assert cka(X, Y) == pytest.approx(direct_debiased_cka(X, Y), abs=1e-10)
    assert abs(cka(X, Y)) < 0.1  # independent random data: debiased CKA near zero


def test_cka_detects_planted_linear_relation():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((200, 30))
    Y_rel = X[:, :10] @ rng.standard_normal((10, 40)) + 0.1 * rng.standard_normal((200, 40))
    Y_ind = rng.standard_normal((200, 40))
    assert cka(X, Y_rel) > 0.5 > 0.1 > abs(cka(X, Y_ind))


@pytest.mark.timeout(1200)  # three runs of the mini study; minutes on a busy 2-core machine
@pytest.mark.long
def test_reproduce_mini_end_to_end(tmp_path):
    """`make reproduce-mini`: two local models x digits, report with resolving links; rerun is a no-op. Two of its
    four heads (the linear and the ALF kind; the others are the same code with other token selections) keep the
    suite short."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    make = ["make", "-C", str(ROOT), "reproduce-mini", f"MINI={tmp_path}", f"ALF={sys.executable} {ROOT / 'cli.py'}",
            "HEADS=linear,alf"]
    p = subprocess.run(make, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "plan: 2 models x 1 datasets" in p.stdout
    rows = list(csv.DictReader(open(tmp_path / "reports" / "tables" / "means_vs_paper.csv")))
    assert sorted((r["model"], r["head"]) for r in rows) == sorted(
        (m, h) for m in ("local-tiny-a", "local-tiny-b") for h in ("linear", "alf"))
    index = tmp_path / "reports" / "index.md"
    links = re.findall(r"\]\(([^)]+)\)", index.read_text())
    assert len(links) >= 10 and all((index.parent / l).is_file() for l in links)
    pngs = [l for l in links if l.endswith(".png")]
    assert len(pngs) == 4 and all((index.parent / l).read_bytes()[:4] == b"\x89PNG" for l in pngs)
    # heatmap rows are attention distributions: they sum to 1
    for hm in (tmp_path / "reports" / "heatmaps").glob("*.csv"):
        for r in csv.reader(open(hm)):
            if r[0] != "dataset":
                assert sum(map(float, r[1:])) == pytest.approx(1.0, abs=1e-4)
    # per-layer table: one row per (layer, kind), CKA of the last layer with itself is 1
    layers = list(csv.DictReader(open(next((tmp_path / "reports" / "layers").rglob("layers.csv")))))
    assert len(layers) in (8, 12) and float(layers[-1]["cka_linear_with_last"]) == pytest.approx(1.0)
    # idempotent: a rerun finds every pair done from its markers, stores and result files, and runs no task
    p2 = subprocess.run(make, capture_output=True, text=True, env=env, timeout=900)
    assert p2.returncode == 0
    assert "build-random-model" in p.stdout and "build-random-model" not in p2.stdout  # models built once
    assert "done: 0 heads trained now; 2 of 2 pair(s) were already done" in p2.stdout
    assert "written" not in p2.stdout and "running" not in p2.stdout and "the report is up to date" in p2.stdout
    # a deleted result file is found missing and only that head is trained again
    next((tmp_path / "results").rglob("alf.json")).unlink()
    p3 = subprocess.run(make, capture_output=True, text=True, env=env, timeout=900)
    assert p3.returncode == 0 and "done: 1 heads trained now; 1 of 2 pair(s) were already done" in p3.stdout
    assert "1 of 2 heads done, running alf" in p3.stdout
    # the first run printed one result line per head, as `alf probe` does
    assert p.stdout.count(": test balanced acc") == 4


def test_reproduce_says_upfront_what_it_cannot_reach(tmp_path):
    from conftest import run_alf

    p = run_alf("reproduce", "--root", tmp_path, "--models", "clip-l,vit-b", "--datasets", "fer2013,svhn")
    assert p.returncode == 2
    assert "hub NOT reachable" in p.stdout
    assert "SKIP model clip-l" in p.stdout and "SKIP dataset fer2013" in p.stdout
    assert "nothing to run" in p.stderr and "Traceback" not in p.stderr
    assert "alf fetch --model clip-l,vit-b" in p.stderr and "alf fetch --dataset fer2013,svhn" in p.stderr
    assert "HF_HUB_OFFLINE=1" in p.stderr and "reproduce-mini" in p.stderr


@pytest.mark.long
def test_reproduce_goes_on_past_a_failing_pair(tiny_model, tmp_path):
    from conftest import run_alf, write_image_folder

    bad = write_image_folder(tmp_path / "imgs")
    (bad / "train" / "dog" / "001.png").write_bytes(b"not an image")
    p = run_alf("reproduce", "--root", tmp_path / "run", "--models", f"local-dir:{tiny_model}", "--datasets",
                f"imagefolder:{bad},digits", "--heads", "linear", "--grid", "quick", "--workers", "0")
    assert p.returncode == 2
    assert "FAILED imagefolder:" in p.stderr and "dog/001.png" in p.stderr
    assert "1 dataset x model pair(s) failed" in p.stderr and "Traceback" not in p.stderr
    rows = list(csv.DictReader(open(tmp_path / "run" / "results" / "summary.csv")))
    assert [(r["dataset"], r["head"]) for r in rows] == [("digits", "linear")]  # the good pair was done
