"""Dataset names resolve without network; local web-dataset shards and saved HF datasets load through
the real code path; image folders split deterministically."""
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from alfcache.datasets import (HUB_DATASETS, PAPER_DATASETS, ImageFolderSource, dataset_slug, open_source)
from alfcache.errors import AlfError
from conftest import write_image_folder


def test_paper_datasets_resolve_to_hub_ids():
    assert len(PAPER_DATASETS) == 19 and "imagenet1k" in HUB_DATASETS
    import csv
    from pathlib import Path

    paper = {r["dataset"] for r in csv.DictReader(open(Path(__file__).parents[1] / "alfstudy" / "paper_results.csv"))}
    assert paper == set(PAPER_DATASETS)  # the same 19 names as the paper's table
    assert HUB_DATASETS["fer2013"].repo == "clip-benchmark/wds_fer2013"
    assert HUB_DATASETS["pets"].repo == "clip-benchmark/wds_vtab-pets"
    assert all(e.repo.startswith("clip-benchmark/wds_") and set(e.sizes) == {"train", "test"}
               for e in HUB_DATASETS.values())


def write_shards(folder, n_per_split=(9, 5), classes=("neutral", "happy", "sad"), ext="webp"):
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), n_per_split):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for shard in range(2):
            with tarfile.open(folder / split / f"{shard}.tar", "w") as t:
                for i in range(shard, n, 2):
                    b = io.BytesIO()
                    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(b, format=ext)
                    for name, data in ((f"{split}{i:04d}.{ext}", b.getvalue()),
                                       (f"{split}{i:04d}.cls", str(i % len(classes)).encode())):
                        ti = tarfile.TarInfo(name)
                        ti.size = len(data)
                        t.addfile(ti, io.BytesIO(data))
    (folder / "classnames.txt").write_text("\n".join(classes) + "\n")


def test_hub_dataset_from_local_shards(tmp_path, monkeypatch):
    write_shards(tmp_path / "wds_fer2013")
    monkeypatch.setenv("ALF_DATASETS_DIR", str(tmp_path))
    src = open_source("fer2013", "train")
    assert len(src) == 9 and src.class_names == ["neutral", "happy", "sad"]
    assert sorted(src.labels.tolist()) == sorted([i % 3 for i in range(9)])
    img = src.load(0)
    assert img.mode == "RGB" and img.size == (24, 24)
    assert src.sample_id(0).startswith("train")
    with pytest.raises(AlfError, match="unknown split 'val'"):
        open_source("fer2013", "val")


def test_hub_dataset_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("ALF_DATASETS_DIR", raising=False)
    with pytest.raises(AlfError, match=r"dataset 'svhn': cannot get clip-benchmark/wds_vtab-svhn \(not in the "
                                      r"Hugging Face cache.*alf fetch --dataset svhn.*ALF_DATASETS_DIR"):
        open_source("svhn", "train")


def test_saved_hf_dataset(tmp_path):
    import datasets as hfd

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(8)]
    feats = hfd.Features({"picture": hfd.Image(), "y": hfd.ClassLabel(names=["ant", "bee"])})
    d = hfd.Dataset.from_dict({"picture": imgs, "y": [0, 1] * 4}, features=feats)
    hfd.DatasetDict({"train": d, "test": d.select(range(4))}).save_to_disk(tmp_path / "saved")
    src = open_source(f"hf:{tmp_path / 'saved'}", "test")
    assert len(src) == 4 and src.class_names == ["ant", "bee"] and src.labels.tolist() == [0, 1, 0, 1]
    assert np.array_equal(np.asarray(src.load(1)), np.asarray(imgs[1]))


def test_image_folder_splits(tmp_path):
    root = write_image_folder(tmp_path / "flat", per_class=10, splits=("",))
    tr, te = ImageFolderSource(root, "train"), ImageFolderSource(root, "test")
    assert len(tr) == 16 and len(te) == 4 and sorted(np.bincount(te.labels)) == [2, 2]
    assert not set(map(tr.sample_id, range(16))) & set(map(te.sample_id, range(4)))
    assert ImageFolderSource(root, "test").fingerprint() == te.fingerprint()  # deterministic


def test_dataset_slugs_cannot_escape(tmp_path):
    assert "/" not in dataset_slug(f"imagefolder:{tmp_path}/../../etc")
    from alfcache.format import store_path

    p = store_path(tmp_path, "../../evil", "../x", "../train")
    assert tmp_path in p.parents and ".." not in p.relative_to(tmp_path).parts


def test_two_tasks_preparing_one_dataset_take_turns(tmp_path):
    """Two study tasks needing the same dataset at once (one per model): one prepares the Hugging Face datasets
    cache while the other waits, then reads the same prepared copy."""
    import subprocess
    import sys
    import time

    write_shards(tmp_path / "mirror" / "wds_fer2013", n_per_split=(400, 5))
    code = """
import os, sys, time, logging
logging.basicConfig(level=logging.WARNING)
from alfcache.datasets import open_source
import datasets
open(sys.argv[1] + '.ready', 'w').close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.005)
src = open_source('fer2013', 'train')
print('N', len(src), src.fingerprint(), sorted(src.labels.tolist())[:5])
"""
    env = dict(__import__("os").environ, ALF_DATASETS_DIR=str(tmp_path / "mirror"), HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "cache"))
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"p{i}"), str(go)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    end = time.time() + 120
    while not all((tmp_path / f"p{i}.ready").exists() for i in range(2)) and time.time() < end:
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    lines = [next(l for l in o[0].splitlines() if l.startswith("N ")) for o in outs]
    assert lines[0] == lines[1] and lines[0].startswith("N 400 ")
    waited = [o for o in outs if "being prepared by another task; waiting" in o[1]]
    assert len(waited) == 1  # the second took its turn instead of preparing it at the same time
    prepared = {p.parent for p in (tmp_path / "cache").rglob("*.arrow")}
    assert len(prepared) == 1  # one prepared copy, read by both
