"""Never a wrong number: stores pair by identity, labels and ids are checked, images keep what they show, result
files are written whole and damaged ones are redone, every bad argument is one line - each case a hostile user
hit before."""
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from alfcache.format import StoreError, read_metadata, verify_store
from conftest import run_alf, write_image_folder
from probes import FeatureSet
from test_errors import one_line_error


def _extract(model, dataset, split, out, cwd=None, *extra):
    p = run_alf("extract", "--model", model, "--dataset", dataset, "--split", split, "--out", out, "--workers", "0",
                *extra, cwd=cwd)
    assert p.returncode == 0, p.stderr
    return p


@pytest.mark.long
def test_same_typed_name_from_two_folders_is_not_a_pair(tiny_model, tmp_path):
    """`imagefolder:ds` typed in two working folders names two datasets: their train and test are refused as a
    pair (the error names both sources); each folder's own pair probes normally."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_image_folder(a / "ds", classes=("cat", "dog"), per_class=4, seed=1)
    write_image_folder(b / "ds", classes=("cat", "dog"), per_class=4, seed=2)
    out = tmp_path / "features"
    _extract(tiny_model, "imagefolder:ds", "train", out, a)
    _extract(tiny_model, "imagefolder:ds", "test", out, b)
    p = run_alf("probe", "--store-root", out, "--grid", "quick", "--head", "linear", "--out", tmp_path / "r")
    err = one_line_error(p, "dataset source", "not a pair")
    assert str((a / "ds").resolve()) in err and str((b / "ds").resolve()) in err
    _extract(tiny_model, "imagefolder:ds", "test", out, a)  # now folder a has both splits
    metas = [read_metadata(s) for s in out.rglob("*.zarr")]
    assert {m["dataset"]["source"] for m in metas} == {f"imagefolder:{(a / 'ds').resolve()}",
                                                      f"imagefolder:{(b / 'ds').resolve()}"}
    slug_a = next(m["dataset"]["slug"] for m in metas if m["dataset"]["source"].endswith("/a/ds"))
    p = run_alf("probe", "--store-root", out, "--grid", "quick", "--head", "linear", "--out", tmp_path / "r",
                "--dataset", slug_a)  # the dataset's folder name (from the store) picks folder a's pair
    assert p.returncode == 0, p.stderr
    rec = json.loads(next((tmp_path / "r").rglob("linear.json")).read_text())
    assert rec["dataset_source"] == f"imagefolder:{(a / 'ds').resolve()}" and rec["dataset_folder"] == slug_a


@pytest.mark.parametrize("split,bad", [("test", 10), ("train", 10), ("test", -5)])
def test_labels_outside_the_class_list_are_refused(digits_stores, tmp_path, split, bad):
    import zarr

    store = tmp_path / f"{split}.zarr"
    shutil.copytree(digits_stores[split], store)
    zarr.open_group(str(store), mode="r+")["labels"][3] = bad
    with pytest.raises(StoreError, match=r"outside its 10 classes \(rows \[3\]"):
        FeatureSet.open(store)
    with pytest.raises(StoreError, match="chunk 0"):  # the checksum covers the labels too
        verify_store(store)


def test_unrecorded_skip_marker_is_refused(digits_stores, tmp_path):
    import zarr

    store = tmp_path / "test.zarr"
    shutil.copytree(digits_stores["test"], store)
    zarr.open_group(str(store), mode="r+")["labels"][5] = -1  # -1 only where a skipped image is recorded
    with pytest.raises(StoreError, match=r"is damaged: 1 row labelled -1 \(skipped\) but it records 0 skipped images"):
        FeatureSet.open(store)


def test_sample_ids_are_covered_by_the_checksums(digits_stores, tmp_path):
    import zarr

    store = tmp_path / "test.zarr"
    shutil.copytree(digits_stores["test"], store)
    assert verify_store(store) >= 1
    zarr.open_group(str(store), mode="r+")["sample_ids"][7] = "digits/999999"
    with pytest.raises(StoreError, match="chunk 0 .*fails its checksum"):
        verify_store(store)


def test_damaged_store_is_named_by_probe_and_ls(digits_stores, tmp_path):
    root = tmp_path / "root" / "digits" / "m"
    root.mkdir(parents=True)
    for split in ("train", "test"):
        shutil.copytree(digits_stores[split], root / f"{split}.zarr")
    (root / "test.zarr" / "zarr.json").write_text("{ truncated")
    one_line_error(run_alf("probe", "--store-root", tmp_path / "root", "--grid", "quick", "--head", "linear",
                           "--out", tmp_path / "r"), "test.zarr", "damaged")
    ls = run_alf("ls", tmp_path / "root")
    assert ls.returncode == 0 and "DAMAGED" in ls.stdout and "test.zarr" in ls.stdout
    (root / "test.zarr" / "zarr.json").unlink()
    one_line_error(run_alf("probe", "--store-root", tmp_path / "root", "--grid", "quick", "--head", "linear",
                           "--out", tmp_path / "r"), "damaged")


def test_high_bit_depth_and_exif_orientation():
    from alfcache.images import to_rgb

    ramp = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)  # 0..65535
    im16 = Image.fromarray(ramp)
    buf = io.BytesIO()
    im16.save(buf, format="PNG")
    loaded = Image.open(io.BytesIO(buf.getvalue()))
    loaded.load()
    assert loaded.mode.startswith("I")
    rgb = np.asarray(to_rgb(loaded))
    np.testing.assert_array_equal(rgb[..., 0], np.arange(256, dtype=np.uint8).reshape(16, 16))  # not clipped white
    assert np.asarray(loaded.convert("RGB"))[..., 0].mean() > 250  # what PIL alone does
    f = Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8))
    assert np.asarray(to_rgb(f))[..., 0].max() == 255 and np.asarray(to_rgb(f))[..., 0].min() == 0
    wide = Image.fromarray(np.linspace(-5e6, 5e6, 64).astype(np.int32).reshape(8, 8))
    assert np.asarray(to_rgb(wide))[..., 0].min() == 0 and np.asarray(to_rgb(wide))[..., 0].max() == 255
    # a photo stored sideways with EXIF orientation 6 (rotate 90 clockwise to view)
    upright = np.zeros((20, 10, 3), dtype=np.uint8)
    upright[:5] = 255  # bright top rows
    stored = Image.fromarray(np.rot90(upright, k=1).copy())  # what the camera wrote: 10 x 20, bright on the left
    exif = stored.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif.tobytes(), quality=100)
    photo = Image.open(io.BytesIO(buf.getvalue()))
    shown = np.asarray(to_rgb(photo))
    assert shown.shape == (20, 10, 3) and shown[:5].mean() > 200 and shown[-5:].mean() < 50
    assert np.asarray(to_rgb(Image.open(io.BytesIO(buf.getvalue())), exif=False)).shape == (10, 20, 3)


def test_image_rules_recorded_in_the_store(digits_stores):
    loading = read_metadata(digits_stores["test"])["dataset"]["image_loading"]
    assert loading["exif_orientation"] == "applied" and "scaled" in loading["high_bit_depth"]


def test_result_files_are_whole_and_damaged_ones_redone(tmp_path, caplog):
    from alfstudy import results as study
    from probes.results import collect, write_result, write_summary

    rec = {"dataset": "d", "model": "m", "head": "linear", "test_balanced_accuracy": 50.0, "chosen": {},
           "protocol_name": "quick", "seed": 0}
    path = write_result(tmp_path, "d", "m", "linear", rec)
    assert study.result_done(path.parent, "linear", "quick", [0])
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary files left behind
    path.write_text("")  # a kill between truncate and write, as the old in-place writes allowed
    with caplog.at_level("WARNING"):
        assert collect(tmp_path) == []
    assert "damaged" in caplog.text and str(path) in caplog.text
    assert not study.result_done(path.parent, "linear", "quick", [0])  # reproduce redoes it
    csv_path, md, rows = write_summary(tmp_path)
    assert rows == [] and csv_path.read_text().startswith("dataset,")


def test_unwritable_outputs_are_named_before_any_work(tiny_model, digits_stores, tmp_path):
    root = digits_stores["train"].parents[2]
    p = run_alf("probe", "--store-root", root, "--grid", "quick", "--head", "linear", "--out", "/proc/alf-results")
    one_line_error(p, "cannot write results to '/proc/alf-results'")
    assert "train" not in p.stdout  # no training happened first
    p = run_alf("extract", "--model", tiny_model, "--dataset", "digits", "--out", "/proc/alf-features")
    one_line_error(p, "cannot write to", "/proc/alf-features")
    assert "free" not in p.stderr


def test_truncated_manifest_and_garbage_lock(tiny_model, tmp_path):
    from alfcache.extract import ExtractConfig, extract

    cfg = dict(model=str(tiny_model), dataset="digits", splits=["test"], out=tmp_path, workers=0, chunk_rows=64,
               progress=False)
    ref = extract(ExtractConfig(**{**cfg, "out": tmp_path / "ref"}))[0].path
    store = tmp_path / "digits" / "local-tiny" / "test.zarr"
    import zarr

    extract(ExtractConfig(**cfg))
    zarr.open_group(str(store), mode="r+").attrs["complete"] = False  # as if killed before the end
    (store / "alf_progress.json").write_text('{"done": {"0": "ab')  # and the manifest torn
    res = extract(ExtractConfig(**cfg))[0]
    assert res.status == "written"  # nothing trusted from the torn manifest: every chunk redone
    np.testing.assert_array_equal(np.asarray(FeatureSet.open(store).cls[:]), np.asarray(FeatureSet.open(ref).cls[:]))
    lock = store.with_name("test.zarr.lock")
    lock.write_text("garbage")
    import os
    import time

    os.utime(lock, (time.time() - 60, time.time() - 60))  # an old unreadable lock: taken over with a warning
    assert extract(ExtractConfig(**{**cfg, "overwrite": True}))[0].status == "written" and not lock.exists()
    lock.write_text("garbage")  # a fresh one may still be being written: named, not taken
    os.utime(lock, (time.time() + 600, time.time() + 600))  # "just now" for the whole of the CLI's start-up
    p = run_alf("extract", "--model", tiny_model, "--dataset", "digits", "--split", "test", "--out", tmp_path,
                "--overwrite", "--workers", "0")
    one_line_error(p, "cannot be read", "--break-lock")
    assert "None" not in p.stderr


@pytest.mark.parametrize("args,needles", [
    (("extract", "--model", "vit-b", "--dataset", "digits", "--workers", "-1"), ["--workers", "-1"]),
    (("extract", "--model", "vit-b", "--dataset", "digits", "--chunk-rows", "-4"), ["--chunk-rows", "-4"]),
    (("extract", "--model", "vit-b", "--dataset", "digits", "--split", ""), ["--split", "empty"]),
    (("extract", "--model", "vit-b", "--dataset", "digits", "--split", "train,,test"), ["--split", "empty name"]),
    (("extract", "--model", "timm:" + "a" * 5000, "--dataset", "digits"), ["--model", "characters"]),
    (("extract", "--model", "", "--dataset", "digits"), ["--model", "empty"]),
    (("extract", "--model", "vit-b", "--dataset", "imagefolder:"), ["empty dataset"]),
    (("extract", "--model", "vit-b", "--dataset", "digits", "--batch-size", "0"), ["--batch-size"]),
    (("extract", "--model", "vit-b", "--dataset", "digits", "--device", "gpu7"), ["--device"]),
    (("extract", "--model", "vit-b", "--dataset", "digits", "--workers", "many"), ["--workers"]),
    (("probe", "--seed", "-1"), ["--seed", "-1"]),
    (("probe", "--head", ""), ["--head", "empty"]),
    (("probe", "--head", "alf,"), ["--head", "empty name"]),
    (("probe", "--protocol", "fast"), ["unknown --protocol 'fast'"]),
    (("report", "--cka", "cosine"), ["--cka"]),
    (("fetch", "--model", "vit-q"), ["unknown model 'vit-q'"]),
    (("build-random-model", "x", "--embed-dim", "30", "--num-heads", "4"), ["--embed-dim"]),
    (("build-random-model", "x", "--arch", "a,,b"), ["unknown timm architecture 'a,,b'"]),
    (("build-random-model", "x", "--arch", "resnet50"), ["--arch 'resnet50' is not a timm VisionTransformer"]),
    (("nosuchcommand",), ["No such command"]),
])
def test_bad_arguments_are_one_line_before_any_work(args, needles):
    """Refused before any model, dataset or store is touched: offline, `vit-b` has no cached weights and there is
    no ./features, so any work done first would have ended in that error instead of the one about the argument."""
    one_line_error(run_alf(*args), *needles)


def test_probe_checks_heads_before_verifying(digits_stores, tmp_path):
    root = digits_stores["train"].parents[2]
    one_line_error(run_alf("probe", "--store-root", root, "--head", "alff"), "unknown head 'alff'", "alf")
