"""Several models, one decode: `alf extract --model a,b,c` decodes each image once and gives every model its own
preprocessing, batches and stores - the same bytes as single-model runs, each store resumable on its own."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from alfcache.extract import ExtractConfig, extract, extract_many
from alfcache.format import open_arrays, read_metadata, required_arrays
from alfcache.loader import segments
from conftest import ROOT


@pytest.fixture(scope="module")
def three_models(tmp_path_factory):
    """Three random-weight models of two families with three preprocessings: timm ViT 16 px bicubic, timm ViT
    24 px bilinear with other mean/std and a 0.75 crop, transformers CLIP 32 px."""
    from alfcache.backbones import build_random_model
    from test_backends import _save_hf

    tmp = tmp_path_factory.mktemp("multi_models")
    a = build_random_model(tmp / "a", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, seed=0)
    b = build_random_model(tmp / "b", img_size=24, patch_size=8, embed_dim=48, depth=3, num_heads=2, seed=1,
                           pretrained_cfg_overlay=dict(mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1),
                                                       interpolation="bilinear", crop_pct=0.75))
    c = _save_hf("clip", tmp / "c")
    return [f"local-dir:{a}", f"local-dir:{b}", f"hf:{c}"]


@pytest.fixture(scope="module")
def twin(three_models, tmp_path_factory):
    """Other weights and depth, the same preprocessing as the first model (as ViT-S/B/L share theirs)."""
    from alfcache.backbones import build_random_model

    return f"local-dir:{build_random_model(tmp_path_factory.mktemp('twin') / 'd', img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, seed=3)}"


def test_equal_preprocessing_is_computed_once(three_models, twin, mixed_folder):
    from alfcache.backbones import load_backbone
    from alfcache.datasets import open_source
    from alfcache.loader import SharedImageDataset

    bbs = [load_backbone(m) for m in [three_models[0], three_models[1], twin, three_models[2]]]
    ds = SharedImageDataset(open_source(f"imagefolder:{mixed_folder}", "test"), [b.transform() for b in bbs],
                            [b.data_config["input_size"] for b in bbs], np.ones((14, 4), bool))
    assert ds.first == [0, 1, 0, 3]
    xs = ds[0][0]
    assert xs[0] is xs[2] and xs[0].shape != xs[1].shape


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """JPEGs and PNGs (RGB, grey, RGBA) of varied sizes in train/test class folders."""
    root = tmp_path_factory.mktemp("mixed") / "ds"
    rng = np.random.default_rng(0)
    for split, n in (("train", 13), ("test", 7)):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(20, 90, size=2)
                arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                img = Image.fromarray(arr)
                if i % 3 == 0:
                    img.save(d / f"{i:03d}.jpg", quality=85)
                elif i % 3 == 1:
                    img.convert("L").save(d / f"{i:03d}.png")
                else:
                    img.convert("RGBA").save(d / f"{i:03d}.png")
    return root


def _same_store(a, b):
    ma, mb = read_metadata(a), read_metadata(b)
    assert ma["chunk_checksums"] == mb["chunk_checksums"]
    drop = lambda m: {k: v for k, v in m.items() if k not in ("created_at", "finished_at")}  # noqa: E731
    assert json.dumps(drop(ma), sort_keys=True) == json.dumps(drop(mb), sort_keys=True)
    with open_arrays(a) as x, open_arrays(b) as y:
        for name in required_arrays(ma):
            u, v = np.asarray(x[name][...]), np.asarray(y[name][...])
            assert u.dtype == v.dtype and u.tobytes() == v.tobytes(), name


def test_segments_refine_every_models_batches():
    """Segments cut at every model's batch boundary, cover only needed rows, and each model's batches are unions
    of consecutive segments it needs."""
    plans = [[[0, 1, 2, 3], [4, 5]], [[2, 3, 4], [5, 6, 7]], [[8, 9]]]
    segs, need = segments(plans, 12)
    assert segs == [[0, 1], [2, 3], [4], [5], [6, 7], [8, 9]]
    for m, batches in enumerate(plans):
        mine = [s for s in segs if need[s[0], m]]
        assert [r for s in mine for r in s] == [r for b in batches for r in b]
        assert all(need[s, m].all() or not need[s, m].any() for s in map(np.array, segs))
    assert not need[10:].any()


@pytest.mark.parametrize("chunk_rows", [None, 6])
def test_multi_model_stores_equal_single_model_runs(three_models, twin, mixed_folder, tmp_path, chunk_rows,
                                                    monkeypatch):
    """Byte for byte: every array, the checksums and the metadata of each model's stores (chunking per model
    when automatic - a ~3 KB chunk target here, so the models cut 11, 5, 7 and 7 rows per chunk and their
    batches of 4 end at different rows -, batches of 4 inside chunks of 6 otherwise)."""
    import alfcache.extract

    monkeypatch.setattr(alfcache.extract, "chunk_rows_for", lambda row_bytes: max(3, 3000 // row_bytes))
    base = dict(dataset=f"imagefolder:{mixed_folder}", workers=0, batch_size=4, chunk_rows=chunk_rows,
                progress=False)
    models = [*three_models, twin]  # the twin shares the first model's preprocessed tensors
    multi = extract_many(ExtractConfig(model=models[0], out=tmp_path / "multi", **base), models)
    rows = set()
    for m in models:
        single = extract(ExtractConfig(model=m, out=tmp_path / "single", **base))
        assert [r.status for r in multi[m]] == ["written", "written"]
        for r_multi, r_single in zip(multi[m], single):
            _same_store(r_multi.path, r_single.path)
            rows.add(read_metadata(r_multi.path)["chunk_rows"])
    if chunk_rows is None:
        assert len(rows) > 1, "the models must chunk their stores differently for this test to mean anything"
    again = extract_many(ExtractConfig(model=models[0], out=tmp_path / "multi", **base), models)
    assert {r.status for rs in again.values() for r in rs} == {"skipped"}


def test_models_per_pass_and_bad_names(three_models, mixed_folder, tmp_path):
    from conftest import run_alf
    from test_errors import one_line_error

    base = dict(dataset=f"imagefolder:{mixed_folder}", workers=0, batch_size=8, splits=["test"], progress=False)
    res = extract_many(ExtractConfig(model=three_models[0], out=tmp_path / "a", **base), three_models,
                       models_per_pass=1)
    ref = extract_many(ExtractConfig(model=three_models[0], out=tmp_path / "b", **base), three_models)
    for m in three_models:
        _same_store(res[m][0].path, ref[m][0].path)
    one_line_error(run_alf("extract", "--model", f"{three_models[0]},{three_models[0]}", "--dataset", "digits",
                           "--out", tmp_path / "c"), "twice")
    one_line_error(run_alf("extract", "--model", f"{three_models[0]},vitb", "--dataset", "digits",
                           "--out", tmp_path / "c"), "unknown model 'vitb'")
    one_line_error(run_alf("extract", "--model", three_models[0], "--models-per-pass", "0", "--dataset", "digits",
                           "--out", tmp_path / "c"), "--models-per-pass")


def _done(store) -> int:
    try:
        return len(json.loads((store / "alf_progress.json").read_text())["done"])
    except (OSError, ValueError):
        return 0


@pytest.mark.long
def test_kill_then_resume_every_store_at_its_own_chunk(three_models, tmp_path):
    """SIGKILL a three-model pass while its stores are at different chunks, rerun: each store resumes at its own
    first missing chunk and ends equal to a single-model run."""
    models = ",".join(three_models)
    args = [sys.executable, str(ROOT / "cli.py"), "extract", "--model", models, "--dataset", "digits", "--split",
            "test", "--workers", "0", "--batch-size", "4", "--chunk-rows", "16"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = tmp_path / "killed"
    p = subprocess.Popen(args + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    stores = []
    while p.poll() is None and time.time() < deadline:
        stores = sorted(out.rglob("test.zarr"))
        if len(stores) == 3 and min(_done(s) for s in stores) >= 3:
            break
        time.sleep(0.005)
    assert p.poll() is None, "the pass finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    before = {s: _done(s) for s in stores}
    assert all(0 < n < 29 for n in before.values()), before  # 450 rows: 29 chunks
    import shutil

    shutil.rmtree(stores[1])  # one store starts over, the other two resume where each stopped
    stores[1].with_name("test.zarr.lock").unlink(missing_ok=True)
    done = subprocess.run(args + ["--out", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("resumed") == 2 and done.stdout.count("written") == 1, done.stdout
    for s in (stores[0], stores[2]):
        assert f"{before[s]} of 29 chunks were already durable" in done.stdout, (before, done.stdout)
    for m in three_models:
        ref = extract(ExtractConfig(model=m, dataset="digits", splits=["test"], out=tmp_path / "ref", workers=0,
                                    batch_size=4, chunk_rows=16, progress=False))[0].path
        got = out / ref.relative_to(tmp_path / "ref")
        _same_store(got, ref)
