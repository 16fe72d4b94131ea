"""Bad input gets one clear line and a non-zero exit, and never touches existing data."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch

from conftest import run_alf, write_image_folder
from alfcache.format import read_metadata
from probes import FeatureSet


def one_line_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    err = [l for l in p.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(err) == 1, p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def test_unknown_model_and_dataset_suggest(tiny_model):
    one_line_error(run_alf("extract", "--model", "clip-l14", "--dataset", "digits"), "unknown model 'clip-l14'", "clip-l")
    one_line_error(run_alf("extract", "--model", str(tiny_model), "--dataset", "fer2031"), "unknown dataset 'fer2031'")
    one_line_error(run_alf("extract", "--model", str(tiny_model), "--dataset", "digits", "--taps", "norm3"),
                   "unknown tap")


def test_hub_model_offline_fails_in_one_line(tmp_path):
    p = run_alf("extract", "--model", "clip-b32", "--dataset", "digits", "--out", tmp_path)
    one_line_error(p, "model 'clip-b32' (vit_base_patch32_clip_224.openai): cannot get the weights from "
                      "timm/vit_base_patch32_clip_224.openai", "alf fetch --model clip-b32", "HF_HUB_OFFLINE=1",
                   "local-dir:")
    assert not any(tmp_path.iterdir())


@pytest.mark.long
def test_lock_refuses_second_writer_and_recovers_stale(tiny_model, tmp_path):
    store = tmp_path / "digits" / "local-tiny" / "test.zarr"
    store.parent.mkdir(parents=True)
    lock = store.with_name("test.zarr.lock")
    holder = subprocess.Popen(["sleep", "60"])  # a live process on this host holds the lock
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "since": "then"}))
        p = run_alf("extract", "--model", tiny_model, "--dataset", "digits", "--split", "test", "--out", tmp_path,
                    "--workers", "0")
        one_line_error(p, f"pid {holder.pid}", "being written")
        assert lock.exists() and not store.exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: the lock is stale and is taken over with a warning
    p = run_alf("extract", "--model", tiny_model, "--dataset", "digits", "--split", "test", "--out", tmp_path,
                "--workers", "0")
    assert p.returncode == 0, p.stderr
    assert "stale" in p.stderr and not lock.exists()
    assert read_metadata(store)["complete"]


@pytest.mark.long
def test_different_weights_into_existing_store_refused(tmp_path):
    from alfcache.backbones import build_random_model

    model = tmp_path / "m"
    args = ("extract", "--model", model, "--dataset", "digits", "--split", "test", "--out", tmp_path / "f",
            "--workers", "0")
    build_random_model(model, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, seed=0)
    assert run_alf(*args).returncode == 0
    store = tmp_path / "f" / "digits" / "local-m" / "test.zarr"
    before = np.asarray(FeatureSet.open(store).cls[:]).copy()
    build_random_model(model, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, seed=1)
    one_line_error(run_alf(*args), "model.fingerprint", "--overwrite")
    np.testing.assert_array_equal(np.asarray(FeatureSet.open(store).cls[:]), before)
    # --overwrite replaces it with the new weights' tokens
    assert run_alf(*args, "--overwrite").returncode == 0
    assert not np.array_equal(np.asarray(FeatureSet.open(store).cls[:]), before)


@pytest.mark.long
def test_corrupt_image_named_then_skipped_on_request(tiny_model, tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    bad = root / "train" / "dog" / "005.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    # grayscale, RGBA and CMYK images are converted, not crashing
    from PIL import Image

    Image.new("L", (20, 20), 128).save(root / "train" / "cat" / "gray.png")
    Image.new("RGBA", (20, 20), (1, 2, 3, 4)).save(root / "train" / "cat" / "rgba.png")
    Image.new("CMYK", (20, 20), (1, 2, 3, 4)).save(root / "train" / "cat" / "cmyk.jpg")
    args = ("extract", "--model", tiny_model, "--dataset", f"imagefolder:{root}", "--out", tmp_path / "f",
            "--workers", "1", "--split", "train")
    one_line_error(run_alf(*args), "dog/005.png", "--skip-corrupt")
    p = run_alf(*args, "--skip-corrupt")
    assert p.returncode == 0, p.stderr
    store = next((tmp_path / "f").rglob("train.zarr"))
    meta = read_metadata(store)
    assert meta["skipped"] == ["dog/005.png"] and meta["num_samples"] == 15
    fs = FeatureSet.open(store)
    assert len(fs) == 14 and (fs.labels == -1).sum() == 1  # the skipped row is excluded from probing


def test_nan_tokens_refused_nothing_complete(tmp_path):
    import timm

    from alfcache.backbones import build_random_model

    model = build_random_model(tmp_path / "nan", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    m = timm.create_model(f"local-dir:{model}", pretrained=True)
    with torch.no_grad():
        m.blocks[1].norm2.weight[3] = float("nan")
    # the architecture's arguments passed on explicitly: timm 1.0.21 does not carry them over by itself (1.0.31 does)
    timm.models.save_for_hf(m, str(model), model_args=json.loads((model / "config.json").read_text())["model_args"])
    p = run_alf("extract", "--model", model, "--dataset", "digits", "--split", "test", "--out", tmp_path / "f",
                "--workers", "0")
    one_line_error(p, "non-finite", "block1.norm2")
    store = tmp_path / "f" / "digits" / "local-nan" / "test.zarr"
    assert not read_metadata(store)["complete"]
    with pytest.raises(Exception, match="incomplete"):
        FeatureSet.open(store)


def test_probe_refuses_mismatched_and_incomplete_stores(tmp_path):
    """Train extracted with one set of weights, test with another under the same model name: refused."""
    from alfcache.backbones import build_random_model
    from alfcache.extract import ExtractConfig, extract

    model, out = tmp_path / "tiny", tmp_path / "f"
    for seed, split in ((0, "train"), (7, "test")):
        build_random_model(model, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, seed=seed)
        extract(ExtractConfig(model=str(model), dataset="digits", splits=[split], out=out, workers=0, progress=False))
    probe = ("probe", "--store-root", out, "--grid", "quick", "--head", "linear", "--out", tmp_path / "r")
    one_line_error(run_alf(*probe), "weights fingerprint")
    # a store whose extraction did not finish is refused unless allowed
    import zarr

    build_random_model(model, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, seed=0)
    extract(ExtractConfig(model=str(model), dataset="digits", splits=["test"], out=out, workers=0, progress=False,
                          overwrite=True))
    test_store = next(out.rglob("test.zarr"))
    zarr.open_group(str(test_store), mode="r+").attrs["complete"] = False
    one_line_error(run_alf(*probe), "incomplete", "--allow-incomplete")
    one_line_error(run_alf("probe", "--store-root", out, "--head", "alff", "--allow-incomplete"),
                   "unknown head 'alff'", "alf")
    one_line_error(run_alf("probe", "--store-root", tmp_path / "nowhere"), "does not exist")
