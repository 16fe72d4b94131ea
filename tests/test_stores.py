"""Zarr and HDF5 round trip, complete metadata, readable with plain zarr/h5py."""
import subprocess
import sys

import numpy as np
import pytest

from alfcache.extract import ExtractConfig, extract
from alfcache.format import read_metadata
from probes import FeatureSet
from conftest import fixture_dir

REQUIRED = ["format", "format_version", "model", "preprocessing", "taps", "token_layout", "dtype", "dataset",
            "split", "class_names", "num_samples", "created_at", "library_versions", "complete", "chunk_checksums"]


@pytest.fixture(scope="module")
def both_formats(tiny_model, tmp_path_factory):
    stores = {}
    for fmt in ("zarr", "h5"):
        with fixture_dir(tmp_path_factory, f"both-{fmt}") as (out, todo):
            if todo:
                extract(ExtractConfig(model=str(tiny_model), dataset="digits", splits=["test"], fmt=fmt, out=out,
                                      workers=0, chunk_rows=100, progress=False))
        (stores[fmt],) = out.rglob(f"test.{fmt}")
    return stores


def test_zarr_and_h5_hold_identical_data(both_formats):
    z, h = FeatureSet.open(both_formats["zarr"]), FeatureSet.open(both_formats["h5"])
    assert both_formats["h5"].suffix == ".h5" and both_formats["h5"].is_file()
    assert not both_formats["h5"].with_name("test.h5.partial").exists()  # staging removed
    np.testing.assert_array_equal(np.asarray(z.cls[:]), np.asarray(h.cls[:]))
    np.testing.assert_array_equal(np.asarray(z.ap[:]), np.asarray(h.ap[:]))
    np.testing.assert_array_equal(z.labels, h.labels)
    assert z.class_names == h.class_names == [str(i) for i in range(10)]


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_metadata_complete(both_formats, fmt):
    m = read_metadata(both_formats[fmt])
    for k in REQUIRED:
        assert k in m, k
    assert m["complete"] is True
    assert m["model"]["fingerprint"].startswith("sha256:") and m["model"]["pretrained_weights"] is False
    assert m["taps"]["modules"][-1] == "norm" and m["num_layers"] == 4 and m["width"] == 32
    assert m["dtype"] == "float16" and m["num_samples"] == 450
    assert len(m["chunk_checksums"]) == 5  # 450 rows in chunks of 100
    assert m["preprocessing"]["input_size"] == [3, 16, 16]


def test_plain_readers_without_alfcache(both_formats):
    """Someone who never installed alfcache can read both stores with plain zarr / h5py."""
    code = f"""
import sys, json
sys.modules['alfcache'] = None; sys.modules['probes'] = None   # any import of them would fail
import zarr, h5py, numpy as np
g = zarr.open_group({str(both_formats['zarr'])!r}, mode='r')
meta = dict(g.attrs)
with h5py.File({str(both_formats['h5'])!r}, 'r') as f:
    hmeta = json.loads(f.attrs['alfcache'])
    assert np.array_equal(f['cls'][:], g['cls'][:]) and np.array_equal(f['labels'][:], g['labels'][:])
    assert f['sample_ids'][0].decode() == g['sample_ids'][0]
print(meta['model']['source_id'], g['cls'].shape, g['cls'].dtype, hmeta['split'])
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "(450, 4, 32) float16 test" in p.stdout


def test_rerun_skips_complete_store(tiny_model, both_formats):
    before = read_metadata(both_formats["zarr"])["finished_at"]
    res = extract(ExtractConfig(model=str(tiny_model), dataset="digits", splits=["test"],
                                out=both_formats["zarr"].parents[2], workers=0, chunk_rows=100, progress=False))
    assert res[0].status == "skipped"
    assert read_metadata(both_formats["zarr"])["finished_at"] == before


def test_memory_mapped_open_reads_only_what_is_asked(tmp_path):
    """Opening a ~190 MB store and reading a few rows must not pull the store into RAM."""
    import psutil
    import zarr

    from alfcache.sinks import ZarrSink

    n, L, D, rows = 8192, 12, 512, 512
    meta = {"format": "alfcache-store", "format_version": 1, "num_samples": n, "num_layers": L, "width": D,
            "dtype": "float16", "chunk_rows": rows, "class_names": ["a", "b"], "complete": False,
            "arrays": {k: {"shape": [n, L, D], "dtype": "float16"} for k in ("cls", "ap")},
            "taps": {"layer_names": [f"l{i}" for i in range(L)], "modules": []}}
    sink = ZarrSink(tmp_path / "big.zarr", meta, create=True)
    rng = np.random.default_rng(0)
    for k in range(n // rows):
        blk = rng.standard_normal((rows, L, D), dtype=np.float32).astype(np.float16)
        sink.write_chunk(k, {"cls": blk, "ap": blk}, (np.arange(rows) % 2).astype(np.int64),
                         [str(i) for i in range(rows)], [])
    sink.finalize()
    del sink, blk
    store_bytes = 2 * n * L * D * 2
    proc = psutil.Process()
    base = proc.memory_info().rss
    fs = FeatureSet.open(tmp_path / "big.zarr")
    from probes.selection import TokenSpec

    x = fs.tokens(np.array([5, 4000, 8000]), TokenSpec("all", "cls+ap"))
    grown = proc.memory_info().rss - base
    assert x.shape == (3, 2 * L, D) and np.allclose(np.linalg.norm(x, axis=-1), 1, atol=1e-5)
    assert grown < store_bytes * 0.15, (grown, store_bytes)
    assert isinstance(fs.cls, zarr.Array)  # lazily backed, not a numpy copy
