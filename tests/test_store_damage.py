"""A store damaged on disk is refused in one line, never read as fill values: every array kind (1-D labels and
sample ids, 3-D tokens, 4-D registers, patches, module taps), its chunk files deleted or truncated and its metadata
deleted, with and without checksum verification, in the Python API, `probe`, `report`, `ls` and `verify`; the
missing-chunk rule read off each array's own chunk grid (any rank, chunk key encoding, sharding, HDF5)."""
import shutil
from pathlib import Path

import numpy as np
import pytest

from alfcache.format import StoreError, read_metadata, verify_store
from conftest import fixture_dir, run_alf
from probes import FeatureSet
from test_errors import one_line_error

ROWS = 64  # rows per chunk: digits' 450 test images make 8 chunks, the last one of 2 rows

# every array kind a store can hold, with the file of its second chunk (rows 64-127) in Zarr's default encoding
ARRAYS = {"labels": "labels/c/1", "sample_ids": "sample_ids/c/1", "cls": "cls/c/1/0/0", "ap": "ap/c/1/0/0",
          "patches": "patches/c/1/0/0", "registers": "registers/c/1/0/0/0",
          "modules/ffn_fc1/cls": "modules/ffn_fc1/cls/c/1/0/0"}


@pytest.fixture(scope="module")
def full_store(tmp_path_factory):
    """A complete test-split store with every optional array: patches, registers (2 per layer), module taps;
    64-row chunks."""
    from alfcache.backbones import build_random_model
    from alfcache.extract import ExtractConfig, extract

    with fixture_dir(tmp_path_factory, "damage") as (tmp, todo):
        if todo:
            model = build_random_model(tmp / "reg", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                       seed=0, reg_tokens=2)
            extract(ExtractConfig(model=f"local-dir:{model}", dataset="digits", out=tmp / "features", workers=0,
                                  splits=["test"], taps="modules", patches=True, registers=True, chunk_rows=ROWS,
                                  batch_size=64, progress=False))
    (path,) = (tmp / "features").rglob("test.zarr")
    assert set(ARRAYS) <= set(read_metadata(path)["arrays"]) | {"labels", "sample_ids"}
    for rel in ARRAYS.values():
        assert (path / rel).is_file(), rel
    return path


@pytest.fixture
def store(full_store, tmp_path) -> Path:
    s = tmp_path / "test.zarr"
    shutil.copytree(full_store, s)
    return s


def _damaged(fn, *needles) -> str:
    with pytest.raises(StoreError) as e:
        fn()
    msg = str(e.value)
    assert "damaged" in msg and "re-extract" in msg and "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_deleted_chunk_file_is_refused_without_verification(store, name):
    """The chunk file goes, its folders stay (c/1/0/ still exists): the store is refused naming the array and the
    rows that would read as fill values, before any read, and `verify` says the same."""
    (store / ARRAYS[name]).unlink()
    assert (store / ARRAYS[name]).parent.is_dir()
    _damaged(lambda: FeatureSet.open(store), f"'{name}'", "rows 64-127", "missing on disk")
    _damaged(lambda: verify_store(store), f"'{name}'", "rows 64-127")


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_deleted_array_metadata_is_refused(store, name):
    (store / name / "zarr.json").unlink()
    _damaged(lambda: FeatureSet.open(store), f"array '{name}'", "metadata")
    _damaged(lambda: FeatureSet.open(store, allow_incomplete=True), f"array '{name}'")
    _damaged(lambda: verify_store(store), f"array '{name}'")


@pytest.mark.parametrize("cut", [0, 10])
def test_truncated_chunk_is_one_error_when_read(store, cut):
    """A chunk file cut short exists, so only decoding can tell: reading its rows is the 'damaged' error naming
    the rows, in every reader (streamed, in RAM, labels at open)."""
    f = store / "ap" / "c" / "2" / "0" / "0"
    f.write_bytes(f.read_bytes()[:cut])
    fs = FeatureSet.open(store)
    from probes.selection import TokenSpec

    fs.tokens(np.arange(0, 128), TokenSpec("last", "cls"))  # other chunks and other arrays read fine
    _damaged(lambda: fs.tokens(np.arange(100, 200), TokenSpec("last", "cls+ap")), "rows 128-191 of 'ap'")
    _damaged(lambda: FeatureSet.open(store, in_memory=True), "'ap'")
    _damaged(lambda: verify_store(store), "chunk 2")
    lab = store / "labels" / "c" / "0"
    lab.write_bytes(lab.read_bytes()[:cut])
    _damaged(lambda: FeatureSet.open(store), "labels")


def test_wrong_shape_or_dtype_metadata_is_refused(store):
    import json

    meta_file = store / "cls" / "zarr.json"
    good = meta_file.read_text()
    doc = json.loads(good)
    doc["shape"][0] -= 1  # an array shorter than the store's N: rows past it would read as nothing
    meta_file.write_text(json.dumps(doc))
    _damaged(lambda: FeatureSet.open(store), "'cls' has shape")
    doc = json.loads(good)
    doc["data_type"] = "float32" if doc["data_type"] == "float16" else "float16"
    meta_file.write_text(json.dumps(doc))
    _damaged(lambda: FeatureSet.open(store), "'cls' holds")


def test_last_partial_chunk_and_first_chunk(store):
    """The check covers every chunk of the grid, first and last (2 rows) included."""
    (store / "cls" / "c" / "7" / "0" / "0").unlink()
    _damaged(lambda: FeatureSet.open(store), "rows 448-449")
    (store / "sample_ids" / "c" / "0").unlink()
    _damaged(lambda: FeatureSet.open(store), "'sample_ids'", "rows 0-63")


def _rewrite(store: Path, name: str, **create):
    """Rewrite one array of the store with other chunking arguments (same values); returns the zarr array."""
    import zarr

    g = zarr.open_group(str(store), mode="r+")
    data = g[name][...]
    del g[name]
    a = g.create_array(name, shape=data.shape, dtype=data.dtype, fill_value=0, **create)
    a[...] = data
    return a, data


def test_other_chunk_key_encoding(store):
    """The chunk keys come from the array's own encoding: with v2-style dotted keys the file is `1.0.0`."""
    _rewrite(store, "cls", chunks=(ROWS, 1, 32), chunk_key_encoding={"name": "v2", "separator": "."})
    assert (store / "cls" / "1.0.0").is_file() and (store / "cls" / "1.1.0").is_file()
    FeatureSet.open(store)  # intact: opens
    (store / "cls" / "1.1.0").unlink()  # a chunk of the second layer only
    _damaged(lambda: FeatureSet.open(store), "'cls'", "rows 64-127")


def test_sharded_array_missing_inner_chunk_and_shard(store):
    """In a sharded array a missing inner chunk lives inside a shard file that exists: its index says so."""
    a, data = _rewrite(store, "ap", chunks=(ROWS, 2, 32), shards=(4 * ROWS, 2, 32))
    assert sorted(p.name for p in (store / "ap" / "c").iterdir()) == ["0", "1"]
    fs = FeatureSet.open(store)
    from probes.selection import TokenSpec

    np.testing.assert_array_equal(fs.tokens(np.arange(450), TokenSpec("all", "ap", normalise="none")),
                                  data.astype(np.float32))
    import zarr

    with zarr.config.set({"array.write_empty_chunks": False}):  # (read when the array is opened)
        a = zarr.open_group(str(store), mode="r+")["ap"]
        a[2 * ROWS:3 * ROWS] = 0  # an all-fill inner chunk is dropped from its shard: rows 128-191 are gone
    _damaged(lambda: FeatureSet.open(store), "'ap'", "rows 128-191")
    (store / "ap" / "c" / "1" / "0" / "0").unlink()  # the whole second shard: rows 256-449
    _damaged(lambda: FeatureSet.open(store), "rows 128-191, 256-449")


def test_hdf5_unwritten_chunks_are_refused(full_store, tmp_path):
    """An HDF5 dataset can hold unallocated chunks (they read as the fill value): refused the same way."""
    import h5py
    import zarr

    g = zarr.open_group(str(full_store), mode="r")
    path = tmp_path / "test.h5"
    with h5py.File(path, "w") as f:
        f.attrs["alfcache"] = __import__("json").dumps(dict(g.attrs))
        for name in ("labels", "cls", "ap", "patches", "registers", "modules/ffn_fc1/cls", "modules/ffn_fc1/ap",
                     *[f"modules/{k}/{t}" for k in read_metadata(full_store)["taps"]["module_taps"]
                       for t in ("cls", "ap", "mean")]):
            if name in f:
                continue
            data = g[name][...]
            ds = f.create_dataset(name, shape=data.shape, dtype=data.dtype, chunks=(ROWS, *data.shape[1:]))
            ds[...] = data
        f.create_dataset("sample_ids", data=np.asarray(g["sample_ids"][...], dtype=object),
                         dtype=h5py.string_dtype(), chunks=(ROWS,))
    FeatureSet.open(path)  # whole: opens
    with h5py.File(path, "r+") as f:
        data = f["cls"][...]
        del f["cls"]
        ds = f.create_dataset("cls", shape=data.shape, dtype=data.dtype, chunks=(ROWS, *data.shape[1:]))
        ds[:ROWS] = data[:ROWS]
        ds[2 * ROWS:] = data[2 * ROWS:]  # chunk 1 never written
    _damaged(lambda: FeatureSet.open(path), "'cls'", "rows 64-127")


@pytest.mark.long
def test_cli_refuses_damaged_stores_in_one_line(full_store, tmp_path):
    """Both cases of the report: a deleted chunk file under --no-verify, a deleted array metadata; `probe`,
    `report`, `ls` and `verify` name the store in one line, nothing is trained or written."""
    root = tmp_path / "root" / "digits" / "m"
    root.mkdir(parents=True)
    shutil.copytree(full_store, root / "test.zarr")
    shutil.copytree(full_store, root / "train.zarr")
    import zarr

    zarr.open_group(str(root / "train.zarr"), mode="r+").attrs["split"] = "train"
    ok = run_alf("probe", "--store-root", tmp_path / "root", "--grid", "quick", "--head", "linear", "--no-verify",
                 "--out", tmp_path / "ok")
    assert ok.returncode == 0, ok.stderr
    (root / "test.zarr" / "cls" / "c" / "1" / "0" / "0").unlink()
    out = tmp_path / "r"
    for args in (("probe", "--no-verify"), ("probe",)):
        err = one_line_error(run_alf(*args, "--store-root", tmp_path / "root", "--grid", "quick", "--head",
                                     "linear", "--out", out), "test.zarr", "damaged", "'cls'", "missing on disk")
        assert "rows 64-127" in err
    assert not list(out.rglob("*.json")), "nothing may be trained on a damaged store"
    one_line_error(run_alf("verify", root / "test.zarr"), "damaged", "'cls'")
    ls = run_alf("ls", tmp_path / "root")
    assert ls.returncode == 0 and "DAMAGED" in ls.stdout, ls.stdout
    shutil.rmtree(root / "test.zarr")
    shutil.copytree(full_store, root / "test.zarr")
    (root / "train.zarr" / "cls" / "zarr.json").unlink()
    one_line_error(run_alf("probe", "--store-root", tmp_path / "root", "--grid", "quick", "--head", "linear",
                           "--no-verify", "--out", out), "train.zarr", "damaged", "array 'cls'")
    one_line_error(run_alf("report", "--store-root", tmp_path / "root", "--results", tmp_path / "ok",
                           "--out", tmp_path / "rep"), "train.zarr", "damaged")


def test_chunk_of_fill_values_is_written_not_missing(tiny_model, tmp_path):
    """A chunk whose every image was skipped holds only fill values (zero tokens, label -1); the writer stores it
    anyway, so such a store is whole - a missing chunk file always means missing data."""
    from alfcache.extract import ExtractConfig, extract
    from conftest import write_image_folder

    root = write_image_folder(tmp_path / "ds", classes=("cat", "dog"), per_class=6)
    for f in sorted((root / "test" / "cat").iterdir())[:4]:
        f.write_bytes(b"not an image")
    (res,) = extract(ExtractConfig(model=f"local-dir:{tiny_model}", dataset=f"imagefolder:{root}", splits=["test"],
                                   out=tmp_path / "f", workers=0, batch_size=2, chunk_rows=4, skip_corrupt=True,
                                   progress=False))
    assert (res.path / "labels" / "c" / "0").is_file() and (res.path / "cls" / "c" / "0" / "0" / "0").is_file()
    fs = FeatureSet.open(res.path)
    assert (fs.labels[:4] == -1).all() and (fs.labels[4:] >= 0).all() and len(fs.labels) == 12
    verify_store(res.path)
