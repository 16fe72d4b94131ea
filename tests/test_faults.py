"""Faults that really happen: full disks, read-only outputs, corrupted chunks, odd or broken input.
Each gives one clear line and a non-zero exit, and never loses what was durably written."""
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from alfcache.errors import AlfError
from alfcache.format import StoreError
from alfcache.extract import ExtractConfig, extract
from conftest import ROOT, run_alf, write_image_folder
from probes import FeatureSet, ProbeError, check_compatible, fit
from probes.features import verify_store
from test_errors import one_line_error


@contextmanager
def mounted_tmpfs(path: Path, opts: str):
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()[:80]})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _cfg(model, out, **kw):
    return ExtractConfig(model=str(model), dataset="digits", splits=["train"], out=out, workers=0, batch_size=16,
                         chunk_rows=64, progress=False, **kw)


def test_enospc_mid_write_keeps_durable_chunks_and_resumes(tiny_model, tmp_path, monkeypatch):
    from alfcache import sinks as stores

    ref = extract(_cfg(tiny_model, tmp_path / "ref"))[0].path
    real_put = stores.ZarrSink._put
    calls = {"n": 0}

    def flaky_put(self, k, *a):
        calls["n"] += 1
        if calls["n"] == 4:  # the storage layer runs out of space on the 4th chunk
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "cls"))
        return real_put(self, k, *a)

    monkeypatch.setattr(stores.ZarrSink, "_put", flaky_put)
    with pytest.raises(AlfError, match="disk full while writing .* resume") as e:
        extract(_cfg(tiny_model, tmp_path / "out"))
    assert "\n" not in str(e.value)
    store = tmp_path / "out" / "digits" / "local-tiny" / "train.zarr"
    done = json.loads((store / "alf_progress.json").read_text())["done"]
    assert sorted(map(int, done)) == [0, 1, 2]
    with pytest.raises(ProbeError, match="incomplete"):
        FeatureSet.open(store)
    a, b = FeatureSet.open(store, allow_incomplete=True), FeatureSet.open(ref)
    np.testing.assert_array_equal(np.asarray(a.cls[:192]), np.asarray(b.cls[:192]))  # durable chunks intact
    monkeypatch.setattr(stores.ZarrSink, "_put", real_put)  # space is back
    res = extract(_cfg(tiny_model, tmp_path / "out"))[0]
    assert res.status == "resumed" and res.chunks_done_before == 3
    np.testing.assert_array_equal(np.asarray(FeatureSet.open(store).cls[:]), np.asarray(b.cls[:]))
    assert verify_store(store) == res.chunks_total


@pytest.mark.long
def test_real_small_filesystem(tiny_model, tmp_path):
    """A 40 KB filesystem is refused up front; on a 1 MB one the disk fills mid-run, then space comes back."""
    with mounted_tmpfs(tmp_path / "tiny_fs", "size=40k") as fs:
        p = run_alf("extract", "--model", tiny_model, "--dataset", "digits", "--split", "train", "--out", fs,
                    "--workers", "0")
        one_line_error(p, "needs about", "free")
    ref = extract(_cfg(tiny_model, tmp_path / "ref"))[0].path
    with mounted_tmpfs(tmp_path / "small_fs", "size=1m") as fs:
        args = [sys.executable, str(ROOT / "cli.py"), "extract", "--model", str(tiny_model), "--dataset", "digits",
                "--split", "train", "--out", str(fs), "--workers", "0", "--batch-size", "2", "--chunk-rows", "64"]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        prog = fs / "digits" / "local-tiny" / "train.zarr" / "alf_progress.json"
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            try:
                if len(json.loads(prog.read_text())["done"]) >= 2:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.005)
        ballast = fs / "ballast"
        subprocess.run(["dd", "if=/dev/zero", f"of={ballast}", "bs=4k", "count=1000"], capture_output=True)
        out, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            pytest.skip("extraction finished before the filesystem could be filled")
        assert proc.returncode == 2 and "disk full" in err and "Traceback" not in err, err
        durable = len(json.loads(prog.read_text())["done"])
        assert durable >= 2
        ballast.unlink()
        p = run_alf(*args[2:])
        assert p.returncode == 0, p.stderr
        assert f"{durable} of 22 chunks were already durable" in p.stdout
        np.testing.assert_array_equal(np.asarray(FeatureSet.open(prog.parent).ap[:]), np.asarray(FeatureSet.open(ref).ap[:]))


def test_read_only_output(tiny_model, tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as fs:
        one_line_error(run_alf("extract", "--model", tiny_model, "--dataset", "digits", "--out", fs / "features",
                               "--workers", "0"), "cannot write to", "Read-only file system")


def test_corrupted_chunks_are_named(digits_stores, tmp_path):
    store = tmp_path / "test.zarr"
    shutil.copytree(digits_stores["test"], store)
    assert verify_store(store) >= 1
    import zarr

    g = zarr.open_group(str(store), mode="r+")
    g["ap"][3] = g["ap"][3] * 1.001  # silent change inside chunk 0: only the checksum can tell
    with pytest.raises(StoreError, match=r"chunk 0 \(rows 0-.*fails its checksum"):
        verify_store(store)
    shutil.rmtree(store)
    shutil.copytree(digits_stores["test"], store)
    chunk_file = store / "cls" / "c" / "0" / "0" / "0"
    raw = bytearray(chunk_file.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = b"\xff" * 64  # bit rot on disk
    chunk_file.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="chunk 0"):
        verify_store(store)
    root = tmp_path / "root" / "digits" / "m"
    root.mkdir(parents=True)
    shutil.copytree(digits_stores["train"], root / "train.zarr")
    shutil.move(str(store), root / "test.zarr")
    one_line_error(run_alf("probe", "--store-root", tmp_path / "root", "--grid", "quick", "--head", "linear",
                           "--out", tmp_path / "r"), "chunk 0", "re-extract")
    one_line_error(run_alf("verify", root / "test.zarr"), "chunk 0")


def test_wrong_format_version_refused(digits_stores, tmp_path):
    import zarr

    store = tmp_path / "test.zarr"
    shutil.copytree(digits_stores["test"], store)
    zarr.open_group(str(store), mode="r+").attrs["format_version"] = 99
    with pytest.raises(StoreError, match="format version 99"):
        FeatureSet.open(store)
    one_line_error(run_alf("verify", store), "format version 99")


def test_class_lists_must_match():
    x = np.random.default_rng(0).standard_normal((6, 2, 4)).astype(np.float32)
    a = FeatureSet.from_arrays(cls=x, ap=x, labels=[0, 1, 2] * 2, class_names=["a", "b", "c"])
    b = FeatureSet.from_arrays(cls=x, ap=x, labels=[0, 1, 2] * 2, class_names=["a", "b", "d"])
    with pytest.raises(ProbeError, match="class names differ"):
        check_compatible(a, b)


def test_nan_features_refused_at_probe_time():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 2, 4)).astype(np.float32)
    x[7, 1, 2] = np.nan
    fs = FeatureSet.from_arrays(cls=x, ap=x, labels=[0, 1] * 20)
    with pytest.raises(ProbeError, match=r"non-finite tokens in rows \[7\]"):
        fit(fs, "linear", grid="quick", progress=False)


def test_empty_class_and_truncated_image(tiny_model, tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    (root / "train" / "bird").mkdir()
    one_line_error(run_alf("extract", "--model", tiny_model, "--dataset", f"imagefolder:{root}", "--out",
                           tmp_path / "f"), "'bird'", "no images in split 'train'")
    (root / "train" / "bird").rmdir()
    good = (root / "train" / "cat" / "000.png").read_bytes()
    (root / "train" / "cat" / "000.png").write_bytes(good[: len(good) // 2])  # truncated file
    one_line_error(run_alf("extract", "--model", tiny_model, "--dataset", f"imagefolder:{root}", "--out",
                           tmp_path / "f", "--workers", "0"), "cat/000.png")
