"""The store contract's small rules (alfcache/format.py) one by one, each against an independent statement of
what it must do: where stores go and what is one, atomic whole-file writes, the metadata lookups pairing relies
on, the chunk grid and checksums (recomputed here from their written definition), reading ahead in order, and
each refusal of read_metadata / verify_store word for word. Fast: no model, small stores written here."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from alfcache import format as F
from alfcache.format import StoreError

from conftest import add_projection, decode_error, fixture_dir


# ------------------------------------------------------------------------------------------ places
@pytest.mark.parametrize("name, want", [("clip-l", "clip-l"), ("a/b", "a-b"), ("../..", "unnamed"),
                                        ("..hidden", "hidden"), ("-x-", "x"), ("v1.2_a", "v1.2_a"),
                                        ("a b:c", "a-b-c"), ("", "unnamed"), ("é", "é"),
                                        ("X-rayX", "X-rayX")])
def test_safe_component(name, want):
    assert F.safe_component(name) == want


def test_store_path_and_format(tmp_path):
    assert F.store_path(tmp_path, "fer/2013", "..", "train") == tmp_path / "fer-2013" / "unnamed" / "train.zarr"
    assert F.store_path(tmp_path, "d", "m", "test", "h5") == tmp_path / "d" / "m" / "test.h5"
    with pytest.raises(StoreError) as e:
        F.store_path(tmp_path, "d", "m", "test", "npz")
    assert str(e.value) == "unknown store format 'npz' (known: zarr, h5)"
    with pytest.raises(StoreError) as e:
        F.store_path("s3://bkt/f", "d", "m", "test", "h5")
    assert str(e.value) == "HDF5 stores live on local disks only; use the zarr format for 's3://bkt/f'"
    assert F.store_format(tmp_path / "a.zarr") == "zarr" and F.store_format(str(tmp_path / "a.h5")) == "h5"
    with pytest.raises(StoreError) as e:
        F.store_format(tmp_path / "a.npz")
    assert str(e.value) == f"'{tmp_path / 'a.npz'}' is not a store path (expected a .zarr folder or an .h5 file)"
    assert F.staging_path(tmp_path / "x" / "train.h5") == tmp_path / "x" / "train.h5.partial"


def test_store_path_and_format_on_object_storage():
    """URLs need the s3 extras (upath, s3fs): the floor environment installs without them."""
    pytest.importorskip("upath")
    pytest.importorskip("s3fs")
    assert str(F.store_path("s3://bkt/f", "d", "m", "test")) == "s3://bkt/f/d/m/test.zarr"
    with pytest.raises(StoreError) as e:
        F.store_format("s3://bkt/a.h5")
    assert str(e.value) == "'s3://bkt/a.h5': HDF5 stores live on local disks only; object storage holds zarr stores"


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.delenv(F.ENV_ROOT, raising=False)
    assert F.default_root() == Path("features")
    monkeypatch.setenv(F.ENV_ROOT, str(tmp_path))
    assert F.default_root() == tmp_path


def test_find_stores(tmp_path):
    """.zarr folders and .h5 files at any depth, sorted; a .zarr file or an .h5 folder is not a store."""
    for d in ("b/m/train.zarr", "a/m/test.zarr", "c/x.h5", "deep/er/still/s.zarr"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "c" / "x.h5").rmdir()
    (tmp_path / "c" / "x.h5").write_bytes(b"")
    (tmp_path / "c" / "file.zarr").write_text("not a folder")
    (tmp_path / "c" / "dir.h5").mkdir()
    want = sorted([tmp_path / "a/m/test.zarr", tmp_path / "b/m/train.zarr", tmp_path / "c/x.h5",
                   tmp_path / "deep/er/still/s.zarr"])
    assert F.find_stores(tmp_path) == want
    assert F.find_stores(str(tmp_path)) == want
    assert F.find_stores(tmp_path / "missing") == []


# ------------------------------------------------------------------------------------------ atomic writes
def test_write_atomic_text_and_bytes(tmp_path):
    p = tmp_path / "m.json"
    F.write_atomic(p, "héllo")
    assert p.read_bytes() == "héllo".encode()
    F.write_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["m.json"]  # no temporary file left


def test_write_atomic_goes_through_a_synced_temporary_file(tmp_path, monkeypatch):
    """The new bytes are written and fsynced in a temporary file beside the target, then renamed over it: at
    every moment the target holds the old content or the new, never a part."""
    p = tmp_path / "m.json"
    p.write_text("old")
    seen = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        seen.append(("fsync", p.read_text()))
        real_fsync(fd)

    def replace(src, dst):
        seen.append(("replace", Path(src).parent == p.parent, Path(src).read_text(), p.read_text()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    F.write_atomic(p, "new")
    assert seen == [("fsync", "old"), ("replace", True, "new", "old")]
    assert p.read_text() == "new"


def test_write_atomic_failure_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "m.json"
    p.write_text("old")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        F.write_atomic(p, "new")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["m.json"]  # the temporary file is removed
    monkeypatch.undo()
    with pytest.raises(TypeError):  # not str or bytes: fails before the rename
        F.write_atomic(p, 3.5)
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["m.json"]


# ------------------------------------------------------------------------------------------ metadata lookups
def test_get_and_differing():
    a = {"model": {"fingerprint": "x", "arch": {"d": 1, "w": 2}}, "dtype": "float16", "n": None}
    b = {"model": {"fingerprint": "y", "arch": {"w": 2, "d": 1}}, "dtype": "float16"}
    assert F.get(a, "model.fingerprint") == "x"
    assert F.get(a, "model.arch") == {"d": 1, "w": 2}
    assert F.get(a, "model.missing") is None and F.get(a, "nope.x") is None
    assert F.get(a, "dtype.x") is None  # through a non-dict
    assert F.differing(a, b, ["dtype", "model.arch", "model.fingerprint", "n", "absent"]) == ["model.fingerprint"]
    assert F.differing(a, b, ["model.fingerprint", "dtype", "model"]) == ["model.fingerprint", "model"]
    assert F.differing({"k": 1}, {"k": 1.0}, ["k"]) == ["k"]  # 1 and 1.0 are written differently
    assert F.differing({"k": [1, 2]}, {"k": [2, 1]}, ["k"]) == ["k"]


def test_identity_keys():
    m = {"dataset": {"name": "d", "source": "hf:x", "index_fingerprint": "i"}, "model": {"source_id": "s",
                                                                                        "fingerprint": "f"}}
    assert F.dataset_key(m) == ("source", "hf:x", "i")
    assert F.dataset_key({"dataset": {"name": "d"}}) == ("name", "d")
    assert F.dataset_key({}) == ("name", None)
    assert F.model_key(m) == ("s", "f") and F.model_key({}) == (None, None)


# ------------------------------------------------------------------------------------------ chunks, checksums
@pytest.mark.parametrize("n, rows, want", [(10, 4, [(0, 0, 4), (1, 4, 8), (2, 8, 10)]), (8, 4, [(0, 0, 4), (1, 4, 8)]),
                                           (1, 4, [(0, 0, 1)]), (0, 4, []), (5, 5, [(0, 0, 5)])])
def test_chunk_ranges(n, rows, want):
    assert list(F.chunk_ranges({"num_samples": n, "chunk_rows": rows})) == want
    assert list(F.chunk_ranges({"num_samples": str(n), "chunk_rows": str(rows)})) == want


def reference_checksum(arrays, labels, ids, version):
    """The docstring's definition, written out independently."""
    data = b""
    for name in sorted(arrays):
        data += name.encode() + np.ascontiguousarray(arrays[name]).tobytes()
    data += np.asarray(labels).astype(np.int64).tobytes()
    if version >= 2:
        data += b"".join(s.encode() + b"\0" for s in ids)
    return hashlib.sha256(data).hexdigest()[:32]


def test_chunk_checksum_definition():
    rng = np.random.default_rng(0)
    arrays = {"cls": rng.normal(size=(3, 2, 4)).astype(np.float16), "ap": rng.normal(size=(3, 2, 4)).astype(np.float16)}
    labels, ids = np.array([0, 2, 1], dtype=np.int32), ["a", "b", "c"]
    for v in (1, 2):
        assert F.chunk_checksum(arrays, labels, ids, v) == reference_checksum(arrays, labels, ids, v)
    base = F.chunk_checksum(arrays, labels, ids)
    assert base == F.chunk_checksum(dict(reversed(arrays.items())), labels.astype(np.int64), ids)  # order, dtype
    assert F.chunk_checksum(arrays, labels, ids, 1) == F.chunk_checksum(arrays, labels, ["x"], 1)  # v1: no ids
    assert F.chunk_checksum(arrays, labels, None, 2) == F.chunk_checksum(arrays, labels, [], 2)
    changed = [F.chunk_checksum({"cls": arrays["cls"], "ap2": arrays["ap"]}, labels, ids),
               F.chunk_checksum({**arrays, "cls": arrays["cls"][:, ::-1]}, labels, ids),  # non-contiguous view
               F.chunk_checksum(arrays, labels[::-1], ids),
               F.chunk_checksum(arrays, labels, ["a", "b", "d"]),
               F.chunk_checksum(arrays, labels, ["ab", "", "c"]),  # the separator counts
               F.chunk_checksum(arrays, labels, ids, 1)]
    assert base not in changed and len(set(changed)) == len(changed)
    assert len(base) == 32


def test_array_checksum_definition():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    want = hashlib.sha256(b"float32|(2, 3)|" + a.tobytes()).hexdigest()[:32]
    assert F.array_checksum(a) == want == F.array_checksum(np.asfortranarray(a))
    assert len({F.array_checksum(a), F.array_checksum(a.reshape(3, 2)), F.array_checksum(a.astype(np.int32)),
                F.array_checksum(a.T)}) == 4


def test_spans_and_rows():
    assert F._spans([8, 0, 4, 4], 4, 10) == [(0, 10)]
    assert F._spans([0, 8], 4, 10) == [(0, 4), (8, 10)]
    assert F._spans([0, 2], 4, 10) == [(0, 6)]  # overlapping pieces merge
    assert F._spans([], 4, 10) == []
    assert F._spans([4], 4, 6) == [(4, 6)]
    assert F._rows([(0, 4), (5, 6)]) == "0-3, 5"
    assert F._rows([(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]) == "0, 2, 4 and 2 more ranges"
    assert F._rows([(0, 2), (3, 4), (5, 7)]) == "0-1, 3, 5-6"
    assert F._rows([(0, 2), (3, 4), (5, 7), (9, 10)]) == "0-1, 3, 5-6 and 1 more ranges"
    assert F._count(1, "row") == "1 row" and F._count(0, "row") == "0 rows" and F._count(2, "row") == "2 rows"


def test_required_and_token_arrays():
    meta = {"arrays": {"cls": {}, "ap": {}, "modules/ffn/cls": {}}}
    assert F.token_arrays(meta) == ["ap", "cls", "modules/ffn/cls"]
    assert F.required_arrays(meta) == ["labels", "sample_ids", "ap", "cls", "modules/ffn/cls"]
    assert F.required_arrays({**meta, "projection": {"checksums": {}}}) == [
        "labels", "sample_ids", "ap", "cls", "modules/ffn/cls", *F.PROJECTION]
    assert F.required_arrays({**meta, "projection": None}) == F.required_arrays(meta)


def test_damaged_messages():
    assert str(F.damaged("/x/train.zarr", "why")) == "store '/x/train.zarr' is damaged: why; re-extract it with --overwrite"
    assert str(F.damaged(None, "why")) == "features are damaged: why"


# ------------------------------------------------------------------------------------------ read-ahead
@pytest.mark.parametrize("ahead", [0, 1, 2, 3, 8])
def test_prefetched_keeps_order_and_bound(ahead):
    """Results in item order, each item computed once, never more than `ahead` calls at a time (one at a time
    for ahead <= 1), and several at a time when allowed."""
    lock, running, peak, calls = threading.Lock(), [0], [0], []

    def fn(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            calls.append(i)
        time.sleep(0.15)  # long enough for every allowed call to be in flight together
        with lock:
            running[0] -= 1
        return i * i

    items = list(range(9))
    assert list(F.prefetched(fn, iter(items), ahead)) == [i * i for i in items]
    assert sorted(calls) == items
    assert peak[0] == (1 if ahead <= 1 else ahead)


def test_prefetched_stays_ahead_of_the_consumer_only_by_ahead():
    started = []
    gen = F.prefetched(lambda i: started.append(i) or i, range(10), 3)
    assert next(gen) == 0
    time.sleep(0.05)
    assert sorted(started) == [0, 1, 2, 3]  # three in flight beyond the one consumed
    assert list(gen) == list(range(1, 10))
    assert list(F.prefetched(lambda i: i, [], 4)) == [] and list(F.prefetched(lambda i: i, [7], 4)) == [7]


def test_read_ahead(monkeypatch, tmp_path):
    monkeypatch.delenv("ALF_READ_AHEAD", raising=False)
    assert F.read_ahead("s3://b/x.zarr") == 8 and F.read_ahead(tmp_path) == 1
    monkeypatch.setenv("ALF_READ_AHEAD", "3")
    assert F.read_ahead("s3://b/x.zarr") == 3 and F.read_ahead(str(tmp_path)) == 1


# ------------------------------------------------------------------------------------------ stores on disk
@pytest.fixture(scope="module")
def chunked_store(tiny_model, tmp_path_factory) -> Path:
    """digits' test split (450 rows) through the tiny model, in chunks of 128 rows (4 chunks, the last of 66)."""
    from alfcache.extract import ExtractConfig, extract

    with fixture_dir(tmp_path_factory, "contract") as (out, todo):
        if todo:
            extract(ExtractConfig(model=f"local-dir:{tiny_model}", dataset="digits", out=out, workers=0,
                                  batch_size=64, chunk_rows=128, splits=["test"], progress=False))
    (path,) = out.rglob("test.zarr")
    return path


@pytest.fixture
def store(chunked_store, tmp_path) -> Path:
    dst = tmp_path / "s" / "test.zarr"
    shutil.copytree(chunked_store, dst)
    return dst


def set_meta(path: Path, **changes) -> None:
    import zarr

    g = zarr.open_group(str(path), mode="r+")
    attrs = dict(g.attrs)
    attrs.update(changes)
    g.attrs.put(attrs)


def test_read_metadata_refusals(store, tmp_path):
    assert F.read_metadata(store)["num_samples"] == 450
    assert F.read_metadata(str(store)) == F.read_metadata(store)
    cases = []
    with pytest.raises(StoreError) as e:
        F.read_metadata(tmp_path / "none.zarr")
    cases.append((str(e.value), f"no store at '{tmp_path / 'none.zarr'}'"))
    set_meta(store, format_version=9)
    with pytest.raises(StoreError) as e:
        F.read_metadata(store)
    cases.append((str(e.value), f"store '{store}' has format version 9; this alfcache reads versions 1, 2 - "
                                f"re-extract it, or use the alfcache release that wrote it"))
    set_meta(store, format_version=2, format="other")
    with pytest.raises(StoreError) as e:
        F.read_metadata(store)
    cases.append((str(e.value), f"store '{store}' is damaged or not an alfcache store (no 'alfcache-store' "
                                f"metadata); re-extract it with --overwrite"))
    (store / "zarr.json").write_text("{")
    with pytest.raises(StoreError) as e:
        F.read_metadata(store)
    cases.append((str(e.value), f"store '{store}' is damaged: its metadata cannot be read (JSONDecodeError); "
                                f"re-extract it with --overwrite"))
    h5 = tmp_path / "bad.h5"
    h5.write_bytes(b"not hdf5")
    with pytest.raises(StoreError) as e:
        F.read_metadata(h5)
    cases.append((str(e.value), f"store '{h5}' is damaged: its metadata cannot be read (OSError); "
                                f"re-extract it with --overwrite"))
    for got, want in cases:
        assert got == want


def test_verify_store_counts_and_names_the_bad_chunk(store):
    """Every chunk is re-read and compared: the count returned, and a changed value in chunk 2 (rows 256-383)
    named, whichever array holds it; labels and sample ids are covered too (version 2)."""
    import zarr

    assert F.verify_store(store) == 4
    g = zarr.open_group(str(store), mode="r+")
    for name, row, value in (("ap", 300, None), ("labels", 383, None), ("sample_ids", 256, "other.png"),
                             ("cls", 449, None)):
        old = g[name][row]
        g[name][row] = value if value is not None else (old + 1 if name == "labels" else old * 1.5 + 0.25)
        k, a, b = (3, 384, 449) if row >= 384 else (2, 256, 383)
        with pytest.raises(StoreError) as e:
            F.verify_store(store)
        assert str(e.value) == (f"store '{store}' is damaged: chunk {k} (rows {a}-{b}) fails its checksum (the data "
                                f"was changed or corrupted on disk); re-extract it with --overwrite")
        g[name][row] = old
    assert F.verify_store(store) == 4


def test_verify_store_refusals(store):
    meta = F.read_metadata(store)
    set_meta(store, complete=False)
    with pytest.raises(StoreError) as e:
        F.verify_store(store)
    assert str(e.value) == (f"store '{store}' is incomplete (extraction did not finish); rerun the extraction to "
                            f"resume it, or pass --allow-incomplete")
    set_meta(store, complete=True, chunk_checksums=None)
    with pytest.raises(StoreError, match="is incomplete"):
        F.verify_store(store)
    set_meta(store, chunk_checksums=meta["chunk_checksums"][:3])
    with pytest.raises(StoreError) as e:
        F.verify_store(store)
    assert str(e.value) == f"store '{store}' is damaged: 3 checksums for 4 chunks; re-extract it with --overwrite"
    set_meta(store, chunk_checksums=meta["chunk_checksums"])
    chunk = next(p for p in (store / "cls").rglob("*") if p.is_file() and p.name != "zarr.json"
                 and p.relative_to(store / "cls").parts[:2] == ("c", "1"))
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(StoreError) as e:
        F.verify_store(store)
    kind = decode_error(store, "cls", slice(128, 256))  # what the codec itself raises: the message names it
    assert str(e.value).startswith(f"store '{store}' is damaged: chunk 1 (rows 128-255) cannot be read ({kind}")
    assert str(e.value).endswith("); it is corrupted; re-extract it with --overwrite")
    chunk.unlink()
    with pytest.raises(StoreError) as e:  # a chunk missing on disk is found before anything is compared
        F.verify_store(store)
    assert str(e.value) == (f"store '{store}' is damaged: 'cls' has no data on disk for rows 128-255 (chunk files "
                            f"missing on disk; they would read as fill values); re-extract it with --overwrite")


def test_verify_store_through_an_open_reader(store):
    """`opened`: the reader's own arrays and metadata are verified (no second opening), the same refusals."""
    import zarr

    with F.open_arrays(store) as arrays:
        assert F.verify_store(store, opened=arrays) == 4
        g = zarr.open_group(str(store), mode="r+")
        g["cls"][3] = g["cls"][3] * 2 + 1
        with pytest.raises(StoreError, match=r"chunk 0 \(rows 0-127\) fails its checksum"):
            F.verify_store(store, opened=arrays)
        assert arrays["labels"][0] is not None  # the reader's arrays stay open
    set_meta(store, complete=False)
    with F.open_arrays(store) as arrays, pytest.raises(StoreError, match="is incomplete"):
        F.verify_store(store, opened=arrays)


def test_version_1_checksums_do_not_cover_sample_ids(store):
    """A version-1 store's checksums were made without sample ids: it verifies with its ids changed."""
    import zarr

    meta = F.read_metadata(store)
    with F.open_arrays(store) as arrays:
        sums = []
        for k, a, b in F.chunk_ranges(meta):
            block = {n: np.asarray(arrays[n][a:b]) for n in F.token_arrays(meta)}
            sums.append(F.chunk_checksum(block, np.asarray(arrays["labels"][a:b]), None, 1))
    set_meta(store, format_version=1, chunk_checksums=sums)
    g = zarr.open_group(str(store), mode="r+")
    g["sample_ids"][5] = "renamed.png"
    assert F.verify_store(store) == 4
    set_meta(store, format_version=2)
    with pytest.raises(StoreError, match="chunk 0 .*fails its checksum"):
        F.verify_store(store)


# ------------------------------------------------------------------------------------------ unwritten rows
# Rows with no stored data read as fill values; the reader refuses them (check_intact). What counts as unwritten
# is read off each format's own bookkeeping: Zarr's stored objects and shard indexes, HDF5's chunk allocation.
@pytest.mark.parametrize("where", ["disk", "memory"])
@pytest.mark.parametrize("index_location", ["start", "end"])
def test_sharded_zarr_rows_without_data(tmp_path, index_location, where):
    """Shards of 20 rows hold inner chunks of 5; the shard index (at the shard's start or end) marks the inner
    chunks that hold nothing; a shard file too short to hold its index holds nothing; a missing shard neither.
    On a local folder and through fsspec (memory://, the store class object storage uses)."""
    import zarr
    from zarr.codecs import BytesCodec, ShardingCodec

    if where == "memory":
        pytest.importorskip("upath")
        url = f"memory://shards-{index_location}-{os.getpid()}/s.zarr"
        fs = F.location(url).fs
        fs.rm(F.location(url).path, recursive=True) if fs.exists(F.location(url).path) else None
        base = F.location(url).path
        truncate = lambda key, n: fs.pipe(f"{base}/{key}", fs.cat_file(f"{base}/{key}")[:n])  # noqa: E731
        delete = lambda key: fs.rm(f"{base}/{key}")  # noqa: E731
        store = lambda: F.zarr_store(url, read_only=False)  # noqa: E731
    else:
        folder = tmp_path / "s.zarr"
        truncate = lambda key, n: (folder / key).write_bytes((folder / key).read_bytes()[:n])  # noqa: E731
        delete = lambda key: (folder / key).unlink()  # noqa: E731
        store = lambda: str(folder)  # noqa: E731
    g = zarr.open_group(store(), mode="w", zarr_format=3)
    a = g.create_array("x", shape=(40, 3), dtype="f4", chunks=(20, 3), fill_value=0, compressors=None,
                       serializer=ShardingCodec(chunk_shape=(5, 3), codecs=[BytesCodec()],
                                                index_location=index_location))
    a[:] = np.arange(1, 121, dtype=np.float32).reshape(40, 3)
    assert F._zarr_unwritten(a) == []
    with zarr.config.set({"array.write_empty_chunks": False}):
        b = zarr.open_group(store(), mode="r+")["x"]
        b[5:10] = 0  # all fill: dropped from shard 0
        b[30:35] = 0  # and from shard 1
    assert F._zarr_unwritten(b) == [(5, 10), (30, 35)]
    truncate("x/c/0/0", 3)  # (the first shard: its rows must not spill into the next one's)
    assert F._zarr_unwritten(b) == [(0, 20), (30, 35)]
    delete("x/c/1/0")
    assert F._zarr_unwritten(b) == [(0, 40)]


def test_hdf5_rows_without_data(tmp_path):
    """Chunked: the rows of chunks never allocated; contiguous: all rows or none; a scalar or an empty dataset
    has no rows to miss."""
    import h5py

    with h5py.File(tmp_path / "a.h5", "w") as f:
        c = f.create_dataset("chunked", shape=(10, 1), dtype="f4", chunks=(3, 1))
        c[0:3] = 1
        c[9:10] = 1  # chunks 1 and 2 (rows 3-8) never written
        full = f.create_dataset("full", shape=(4, 2), dtype="f4", chunks=(2, 2))
        full[...] = 1
        f.create_dataset("contiguous_unwritten", shape=(3, 5), dtype="f4")
        one = f.create_dataset("one_byte", shape=(1,), dtype="u1")
        one[...] = 7
        f.create_dataset("scalar_unwritten", shape=(), dtype="f4")
        f.create_dataset("empty", shape=(0, 3), dtype="f4")
        assert F._h5_unwritten(f["chunked"]) == [(3, 9)]
        assert F._h5_unwritten(f["full"]) == []
        assert F._h5_unwritten(f["contiguous_unwritten"]) == [(0, 3)]
        assert F._h5_unwritten(f["one_byte"]) == []
        assert F._h5_unwritten(f["scalar_unwritten"]) == []
        assert F._h5_unwritten(f["empty"]) == []


def test_error_chain_follows_causes_first_and_stops_at_a_cycle():
    """explain reads every exception behind the one raised: the explicit cause before the implicit context, each
    once even where the chain loops back."""
    import itertools

    a, b, c = ValueError("a"), KeyError("b"), OSError("c")
    a.__cause__, a.__context__ = b, c
    assert list(F._chain(a)) == [a, b]
    a.__cause__ = None
    assert list(F._chain(a)) == [a, c]
    c.__context__ = a  # a loop: a -> c -> a
    assert list(itertools.islice(F._chain(a), 5)) == [a, c]
    b.__cause__ = b  # a self-loop
    assert list(itertools.islice(F._chain(b), 5)) == [b]


def test_token_arrays_are_stored_with_the_documented_codec(chunked_store):
    """Token arrays: Blosc lz4, level 5, bit-shuffle (the README's choice: as small as zstd on float16, faster to
    decode); the codec is recorded in each array's own metadata, so plain zarr reads it."""
    meta = json.loads((chunked_store / "cls" / "zarr.json").read_text())
    blosc = [c for c in meta["codecs"] if c["name"] == "blosc"]
    assert len(blosc) == 1
    assert {k: blosc[0]["configuration"][k] for k in ("cname", "clevel", "shuffle")} == \
        {"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}


def test_open_arrays_closes_an_hdf5_file(tmp_path, chunked_store):
    """StoreArrays.close releases an HDF5 file (Zarr groups hold nothing open)."""
    import h5py
    import zarr

    g = zarr.open_group(str(chunked_store), mode="r")
    path = tmp_path / "test.h5"
    with h5py.File(path, "w") as f:
        f.attrs["alfcache"] = json.dumps(dict(g.attrs))
        f.create_dataset("labels", data=g["labels"][...])
        f.create_dataset("sample_ids", data=np.asarray(g["sample_ids"][...], dtype=object), dtype=h5py.string_dtype())
    arrays = F.open_arrays(path)
    handle = arrays.handle
    assert handle.id.valid
    ids = [str(s) for s in g["sample_ids"][...]]
    assert arrays.ids() == ids and arrays.ids(1, 3) == ids[1:3] and all(isinstance(i, str) for i in arrays.ids(0, 2))
    arrays.close()
    assert not handle.id.valid
    with F.open_arrays(chunked_store) as z:
        assert "labels" in z


def test_verify_store_shows_a_progress_bar_it_clears(chunked_store, capsys):
    """progress=True: a tqdm bar named after the store, counting its 4 chunks, erased when done (leave=False);
    the count returned is the same as without it."""
    assert F.verify_store(chunked_store, progress=True) == 4
    err = capsys.readouterr().err
    assert "verify test.zarr:" in err and "0/4" in err and "chunk/s" in err
    assert err.endswith("\r") and "4/4" not in err, "the bar is left on screen"
    assert F.verify_store(chunked_store) == 4 and capsys.readouterr().err == ""


def test_write_atomic_on_object_storage():
    """On object storage one PUT of the whole object (text encoded as UTF-8, bytes as they are)."""
    pytest.importorskip("upath")
    url = f"memory://atomic-{os.getpid()}/d/m.json"
    F.write_atomic(url, "héllo")
    assert F.location(url).read_bytes() == "héllo".encode()
    F.write_atomic(url, b"\x00\x01")
    assert F.location(url).read_bytes() == b"\x00\x01"
    assert [p.name for p in F.location(url).parent.iterdir()] == ["m.json"]


def test_verify_store_checks_the_projection(store):
    """A store that records the model's output projection (CLIP) verifies its weight and bias against their
    checksums: changed or unreadable, it is damaged, named by the array."""
    import zarr

    rng = np.random.default_rng(0)
    arrays = {"projection/weight": rng.normal(size=(3, 32)).astype(np.float32),
              "projection/bias": rng.normal(size=3).astype(np.float32)}
    add_projection(store, *arrays.values())
    g = zarr.open_group(str(store), mode="r+")
    assert F.verify_store(store) == 4
    g["projection/bias"][1] = 0.5
    with pytest.raises(StoreError) as e:
        F.verify_store(store)
    assert str(e.value) == f"store '{store}' is damaged: 'projection/bias' fails its checksum; re-extract it with --overwrite"
    g["projection/bias"][...] = arrays["projection/bias"]
    assert F.verify_store(store) == 4
    chunk = store / "projection" / "weight" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:7])
    kind = decode_error(store, "projection/weight", Ellipsis)
    with pytest.raises(StoreError) as e:
        F.verify_store(store)
    assert str(e.value) == (f"store '{store}' is damaged: 'projection/weight' cannot be read ({kind}); "
                            f"re-extract it with --overwrite")


def test_check_intact_holds_labels_and_ids_to_the_sample_count(store):
    """labels and sample ids must have one entry per sample (num_samples), whatever their own metadata says; an
    array whose metadata cannot be read is named with the error's type."""
    import zarr

    meta = F.read_metadata(store)
    F.check_intact(store, meta, zarr.open_group(str(store), mode="r"))
    for name in ("labels", "sample_ids"):
        g = zarr.open_group(str(store), mode="r+")
        g[name].resize((451,))
        with pytest.raises(StoreError) as e:
            F.check_intact(store, meta, zarr.open_group(str(store), mode="r"))
        assert f"array '{name}' has shape (451,), its metadata says (450,)" in str(e.value)
        g[name].resize((450,))
    F.check_intact(store, meta, zarr.open_group(str(store), mode="r"))
    (store / "labels" / "zarr.json").unlink()
    g = zarr.open_group(str(store), mode="r")
    with pytest.raises(Exception) as raised:
        g["labels"]
    with pytest.raises(StoreError) as e:
        F.check_intact(store, meta, g)
    assert (f"array 'labels' is missing or its metadata cannot be read ({type(raised.value).__name__})"
            in str(e.value)) and type(raised.value).__name__ != "NoneType"


def test_check_intact_reads_every_array_and_names_what_fails(store, monkeypatch):
    """Without the chunk listing (an incomplete store opened to resume or inspect) every array is still held to
    its recorded shape and dtype, the last one too; the dtype line and the line for chunks that cannot be listed
    word for word (a StoreError from the listing passes unchanged)."""
    import zarr

    meta = F.read_metadata(store)
    g = zarr.open_group(str(store), mode="r")
    last = F.required_arrays(meta)[-1]
    held = np.dtype(g[last].dtype)
    other = "float64" if held != np.float64 else "float32"
    wrong = {**meta, "arrays": {**meta["arrays"], last: {**meta["arrays"][last], "dtype": other}}}
    F.check_intact(store, meta, g, chunks=False)
    with pytest.raises(StoreError) as e:
        F.check_intact(store, wrong, g, chunks=False)
    assert str(e.value) == (f"store '{store}' is damaged: array '{last}' holds {held}, its metadata says {other}; "
                            f"re-extract it with --overwrite")

    def unlistable(arr):
        raise OSError("listing refused")

    monkeypatch.setattr(F, "_zarr_unwritten", unlistable)
    F.check_intact(store, meta, g, chunks=False)  # no listing asked
    with pytest.raises(StoreError) as e:
        F.check_intact(store, meta, g)
    assert str(e.value) == (f"store '{store}' is damaged: the chunks of '{F.required_arrays(meta)[0]}' cannot be "
                            f"listed (OSError: listing refused); re-extract it with --overwrite")
    own = StoreError("its own line")
    monkeypatch.setattr(F, "_zarr_unwritten", lambda arr: (_ for _ in ()).throw(own))
    with pytest.raises(StoreError) as e:
        F.check_intact(store, meta, g)
    assert e.value is own


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_unwritten_on_any_array_layout(tmp_path, zarr_format):
    """Rows without stored data, read off the keys present, for arrays of either Zarr version (version 2 has no
    codec list), at a store's root (no path prefix), with a dimension of length 1; a scalar or an empty array
    has none."""
    import zarr

    root = zarr.create_array(str(tmp_path / "root"), shape=(6, 1), chunks=(2, 1), dtype="f4", fill_value=0,
                             zarr_format=zarr_format)
    root[:] = 1
    assert root.path == "" and F._zarr_unwritten(root) == []
    g = zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=zarr_format)
    a = g.create_array("x", shape=(6, 1), chunks=(2, 1), dtype="f4", fill_value=0)
    a[:] = 1
    assert F._zarr_unwritten(a) == []
    key = "x/1.0" if zarr_format == 2 else "x/c/1/0"
    (tmp_path / "g" / key).unlink()
    assert F._zarr_unwritten(a) == [(2, 4)]
    (tmp_path / "root" / ("2.0" if zarr_format == 2 else "c/2/0")).unlink()
    assert F._zarr_unwritten(root) == [(4, 6)]
    s = g.create_array("s", shape=(), dtype="f4", fill_value=0)
    assert F._zarr_unwritten(s) == []
    e = g.create_array("e", shape=(0, 3), chunks=(2, 3), dtype="f4", fill_value=0)
    assert F._zarr_unwritten(e) == []


def test_open_arrays_is_read_only(store):
    """The probe stage reads stores and never writes them: the arrays and the metadata open_arrays hands out
    refuse writes, and the store is unchanged."""
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    with F.open_arrays(store) as arrays:
        labels = np.asarray(arrays["labels"][:4])
        with pytest.raises(Exception):
            arrays["labels"][:4] = labels + 1
        with pytest.raises(Exception):
            arrays.handle.attrs["complete"] = False
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before


def test_a_zarr_v2_group_is_not_a_store(store, tmp_path):
    """The format is Zarr v3 (zarr.json, chunk keys c/...): a Zarr v2 group carrying a store's very metadata (a
    conversion, another writer) is not read as a store, neither its metadata nor its arrays; the second error
    is open_arrays' own (the metadata it was given is not read again)."""
    import zarr

    meta = F.read_metadata(store)
    v2 = tmp_path / "v2" / "test.zarr"
    g = zarr.open_group(str(v2), mode="w", zarr_format=2)
    g.attrs.put(meta)
    g.create_array("labels", shape=(meta["num_samples"],), dtype="int64")
    try:  # the error zarr raises for a v3 group that is not there (its type name is in the messages)
        zarr.open_group(str(v2), mode="r", zarr_format=3)
        raise AssertionError("zarr opened a v2 group as v3")
    except Exception as x:  # noqa: BLE001
        kind = type(x).__name__
    with pytest.raises(StoreError) as e:
        F.read_metadata(v2)
    assert str(e.value) == f"store '{v2}' is damaged: its metadata cannot be read ({kind}); re-extract it with --overwrite"
    with pytest.raises(StoreError) as e:
        F.open_arrays(v2, meta)
    assert str(e.value) == f"store '{v2}' is damaged: it cannot be opened ({kind}); re-extract it with --overwrite"
