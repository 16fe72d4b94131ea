"""The store format: the one contract between extraction (`alfcache`) and probing (`probes`).

Everything a reader or a writer must agree on lives here and nowhere else: where a store lives, its two
on-disk formats (Zarr directory, HDF5 file), the metadata keys that identify it, which versions can be read,
the chunk checksum, label rules, discovery and verification. It imports only numpy, zarr, h5py and the
standard library, so `probes` can use it without pulling in any backbone library.

Logical layout (both formats, all per-sample arrays chunked along N):
    cls        (N, L, D)  float16|float32  token 0 of each tapped layer
    ap         (N, L, D)  float16|float32  mean of the patch tokens (prefix/register tokens excluded)
    labels     (N,)       int64            index into metadata class_names; -1 = image skipped (recorded)
    sample_ids (N,)       str              source path / key / index of each row
    optional: patches (N, P, D), registers (N, L, R, D), modules/<kind>/{cls,ap,mean} (N, n, D_kind)
    optional, not per sample: projection/weight (E, D), projection/bias (E,): the model's output projection
        (CLIP's `visual.proj`); the model's own output for a final-layer token t is t @ weight.T + bias.
Metadata: Zarr group attributes / the HDF5 root attribute `alfcache` (JSON).

Versions: 1 (checksums over token arrays + labels), 2 (checksums also cover sample_ids; dataset identity,
protocol and projection recorded). Both are read.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

FORMAT = "alfcache-store"
VERSION = 2
READABLE_VERSIONS = (1, 2)
SUFFIXES = {".zarr": "zarr", ".h5": "h5"}
ENV_ROOT = "ALF_FEATURES"
PROJECTION = ("projection/weight", "projection/bias")

# metadata that must agree for a rerun to continue (resume) an existing store
RESUME_KEYS = ("model.source_id", "model.fingerprint", "model.architecture", "preprocessing", "taps", "arrays",
               "dtype", "dataset.source", "dataset.fingerprint", "dataset.image_loading", "split", "num_samples",
               "chunk_rows", "format_version", "extraction.autocast", "extraction.protocol")
# metadata that must agree between the train and test stores of one probe (label meaning, token meaning)
PAIR_KEYS = (("model.source_id", "model"), ("model.fingerprint", "weights fingerprint"),
             ("model.architecture", "model architecture"), ("taps.modules", "taps"), ("dtype", "dtype"),
             ("class_names", "class names"), ("width", "width"), ("num_layers", "layers"),
             ("preprocessing", "preprocessing"), ("dataset.source", "dataset source"),
             ("dataset.index_fingerprint", "dataset index"), ("dataset.image_loading", "image decoding"),
             ("extraction.autocast", "autocast precision"), ("extraction.protocol", "extraction protocol"))


def dataset_key(meta: dict) -> tuple:
    """What identifies a store's dataset: its resolved source and whole-index fingerprint (version 1 stores,
    which lack them, fall back to the name they recorded)."""
    d = meta.get("dataset", {})
    if d.get("source"):
        return ("source", d["source"], d.get("index_fingerprint"))
    return ("name", d.get("name"))


def model_key(meta: dict) -> tuple:
    """What identifies a store's model: its resolved origin and the hash of its weights."""
    m = meta.get("model", {})
    return (m.get("source_id"), m.get("fingerprint"))


class StoreError(Exception):
    """A store is missing, damaged, of another format or does not fit: shown to the user as one line."""


# ------------------------------------------------------------------------------------------ places
def default_root() -> Path:
    """Where stores live unless told otherwise: $ALF_FEATURES or ./features."""
    return Path(os.environ.get(ENV_ROOT, "features"))


def safe_component(name: str) -> str:
    """A folder name from a user-supplied name: no separators, no '..', no leading dots."""
    out = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)
    out = out.strip(".-")
    return out or "unnamed"


def store_path(root: str | Path, dataset_slug: str, model_slug: str, split: str, fmt: str = "zarr") -> Path:
    """`<root>/<dataset>/<model>/<split>.<fmt>`, every component sanitised (stores always land under root)."""
    if fmt not in SUFFIXES.values():
        raise StoreError(f"unknown store format '{fmt}' (known: {', '.join(SUFFIXES.values())})")
    return Path(root) / safe_component(dataset_slug) / safe_component(model_slug) / f"{safe_component(split)}.{fmt}"


def store_format(path: str | Path) -> str:
    """'zarr' or 'h5', from the suffix."""
    fmt = SUFFIXES.get(Path(path).suffix)
    if fmt is None:
        raise StoreError(f"'{path}' is not a store path (expected a .zarr folder or an .h5 file)")
    return fmt


def staging_path(path: Path) -> Path:
    """HDF5 stores are built in `<store>.partial/` and renamed into place when complete."""
    return path.with_name(path.name + ".partial")


def find_stores(root: str | Path) -> list[Path]:
    """Every store-shaped path under root (a .zarr folder or an .h5 file), readable or not."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.rglob("*.zarr") if p.is_dir()] + [p for p in root.rglob("*.h5") if p.is_file()]
    return sorted(found)


# ------------------------------------------------------------------------------------------ files
def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write a whole file so that a reader sees the old content or the new one, never a torn one: a temporary
    file beside it, fsync, rename. Every file the project writes (manifests, results, summaries) goes this way."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------ metadata
def get(meta: dict, dotted: str):
    """meta['a']['b'] for 'a.b'; None where any part is missing."""
    cur = meta
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def differing(a: dict, b: dict, keys: Iterable[str]) -> list[str]:
    """The dotted keys whose values differ between two metadata dicts."""
    return [k for k in keys if not _same(get(a, k), get(b, k))]


def _raw_metadata(path: Path) -> dict:
    if store_format(path) == "h5":
        import h5py

        with h5py.File(path, "r") as f:
            return json.loads(f.attrs["alfcache"])
    import zarr

    return dict(zarr.open_group(str(path), mode="r").attrs)


def read_metadata(path: str | Path) -> dict:
    """The metadata of a store of either format, checked: an alfcache store of a readable version."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"no store at '{path}'")
    try:
        meta = _raw_metadata(path)
    except StoreError:
        raise
    except Exception as e:  # missing / broken zarr.json, truncated .h5, unreadable attribute
        raise StoreError(f"store '{path}' is damaged: its metadata cannot be read ({type(e).__name__}); "
                         f"re-extract it with --overwrite") from None
    if meta.get("format") != FORMAT:
        raise StoreError(f"store '{path}' is damaged or not an alfcache store (no '{FORMAT}' metadata); "
                         f"re-extract it with --overwrite")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise StoreError(f"store '{path}' has format version {meta.get('format_version')}; this alfcache reads "
                         f"versions {', '.join(map(str, READABLE_VERSIONS))} - re-extract it, or use the alfcache "
                         f"release that wrote it")
    return meta


def token_codec():
    """Blosc lz4 + bit-shuffle for token arrays: on float16 tokens it compresses as well as zstd and decodes
    1.3-2.7x faster (benchmarks/bench_store.py); readers need nothing but zarr (the codec is in the metadata)."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")


# ------------------------------------------------------------------------------------------ arrays
class StoreArrays:
    """An open store: `arrays[name]` is a lazily read array (zarr.Array / h5py.Dataset, numpy-style slicing)
    for 'cls', 'labels', 'modules/ffn_fc1/cls', ...; `ids(a, b)` reads sample ids as str."""

    def __init__(self, path: Path, handle, meta: dict):
        self.path, self.handle, self.meta = path, handle, meta
        self.fmt = store_format(path)

    def __getitem__(self, name: str):
        return self.handle[name]

    def __contains__(self, name: str) -> bool:
        try:
            self.handle[name]
        except KeyError:
            return False
        return True

    def ids(self, a: int = 0, b: int | None = None) -> list[str]:
        ds = self.handle["sample_ids"]
        if self.fmt == "h5":
            return list(ds.asstr()[a:b])
        return [str(s) for s in ds[a:b]]

    def close(self) -> None:
        if hasattr(self.handle, "close"):
            self.handle.close()

    def __enter__(self) -> "StoreArrays":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_arrays(path: str | Path, meta: dict | None = None) -> StoreArrays:
    """Open a store of either format read-only (its metadata checked unless given)."""
    path = Path(path)
    meta = read_metadata(path) if meta is None else meta
    try:
        if store_format(path) == "h5":
            import h5py

            handle = h5py.File(path, "r")
        else:
            import zarr

            handle = zarr.open_group(str(path), mode="r")
    except Exception as e:
        raise damaged(path, f"it cannot be opened ({type(e).__name__})") from None
    return StoreArrays(path, handle, meta)


def token_arrays(meta: dict) -> list[str]:
    """Names of the per-sample token arrays of a store (all chunked along N)."""
    return sorted(meta["arrays"])


# ------------------------------------------------------------------------------------------ checksums
def chunk_checksum(arrays: dict[str, np.ndarray], labels: np.ndarray, sample_ids: list[str] | None,
                   version: int = VERSION) -> str:
    """Checksum of one chunk: sha256 over every token array sorted by name (its name in utf-8, then its C-order
    bytes), then the labels as int64 bytes, then (version >= 2) every sample id in utf-8 followed by a NUL byte;
    the first 32 hex digits."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    if version >= 2:
        for s in sample_ids or []:
            h.update(str(s).encode() + b"\0")
    return h.hexdigest()[:32]


def array_checksum(arr: np.ndarray) -> str:
    """Checksum of a whole small array (the projection): sha256 of dtype, shape and bytes, 32 hex digits."""
    arr = np.ascontiguousarray(arr)
    return hashlib.sha256(f"{arr.dtype}|{arr.shape}|".encode() + arr.tobytes()).hexdigest()[:32]


def chunk_ranges(meta: dict) -> Iterator[tuple[int, int, int]]:
    """(chunk index, first row, end row) of every chunk of a store."""
    rows, n = int(meta["chunk_rows"]), int(meta["num_samples"])
    for k in range((n + rows - 1) // rows):
        yield k, k * rows, min(n, (k + 1) * rows)


# ------------------------------------------------------------------------------------------ labels
def _count(k: int, noun: str) -> str:
    return f"{k} {noun}" + ("" if k == 1 else "s")


def check_labels(labels: np.ndarray, meta: dict, path: Path | str | None = None) -> None:
    """Labels must index `class_names`; -1 only marks an image recorded as skipped. Anything else is refused:
    a label outside the class list would silently change accuracies."""
    labels = np.asarray(labels)
    n_classes = len(meta.get("class_names", []))
    bad = np.flatnonzero((labels < -1) | (labels >= n_classes))
    if len(bad):
        raise damaged(path, f"labels hold values outside its {n_classes} classes (rows {bad[:5].tolist()}: "
                            f"{labels[bad[:5]].tolist()})")
    skipped = int((labels == -1).sum())
    recorded = len(meta.get("skipped", []))
    if meta.get("complete") and skipped != recorded:
        raise damaged(path, f"{_count(skipped, 'row')} labelled -1 (skipped) but it records "
                            f"{_count(recorded, 'skipped image')}")


# ------------------------------------------------------------------------------------------ verification
def verify_store(path: str | Path, progress: bool = False) -> int:
    """Re-read every chunk of a complete store (every token array, labels and, from version 2, sample ids) and
    compare its checksum; also the projection arrays. Names the first bad chunk. Returns the number of chunks."""
    path = Path(path)
    meta = read_metadata(path)
    sums = meta.get("chunk_checksums")
    if not meta.get("complete") or sums is None:
        raise StoreError(f"store '{path}' is incomplete (extraction did not finish); rerun the extraction to "
                         f"resume it, or pass --allow-incomplete")
    version = int(meta["format_version"])
    names = token_arrays(meta)
    ranges = list(chunk_ranges(meta))
    if len(ranges) != len(sums):
        raise damaged(path, f"{len(sums)} checksums for {len(ranges)} chunks")
    with open_arrays(path, meta) as arrays:
        check_intact(path, meta, arrays.handle)
        it = ranges
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(ranges, desc=f"verify {path.name}", unit="chunk", leave=False)
        for k, a, b in it:
            try:
                block = {name: np.asarray(arrays[name][a:b]) for name in names}
                labels = np.asarray(arrays["labels"][a:b])
                ids = arrays.ids(a, b) if version >= 2 else None
            except Exception as e:
                raise damaged(path, f"chunk {k} (rows {a}-{b - 1}) cannot be read ({type(e).__name__}); "
                                    f"it is corrupted") from None
            if chunk_checksum(block, labels, ids, version) != sums[k]:
                raise damaged(path, f"chunk {k} (rows {a}-{b - 1}) fails its checksum (the data was changed or "
                                    f"corrupted on disk)")
        proj = meta.get("projection")
        if proj:
            for name in PROJECTION:
                try:
                    got = array_checksum(np.asarray(arrays[name][...]))
                except Exception as e:
                    raise damaged(path, f"'{name}' cannot be read ({type(e).__name__})") from None
                if got != proj["checksums"][name]:
                    raise damaged(path, f"'{name}' fails its checksum")
    return len(sums)


def required_arrays(meta: dict) -> list[str]:
    """Every array a store must hold: labels, sample ids, every per-sample token array its metadata lists
    (cls, ap, patches, registers, module taps) and the projection when it records one."""
    names = ["labels", "sample_ids", *token_arrays(meta)]
    if meta.get("projection"):
        names += list(PROJECTION)
    return names


def damaged(path: str | Path | None, why: str) -> StoreError:
    """The one error for a store damaged on disk: names the store, what is wrong and the way out."""
    if path is None:  # feature arrays built in memory, not a store
        return StoreError(f"features are damaged: {why}")
    return StoreError(f"store '{path}' is damaged: {why}; re-extract it with --overwrite")


def _rows(spans: list[tuple[int, int]]) -> str:
    shown = ", ".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in spans[:3])
    return shown + (f" and {len(spans) - 3} more ranges" if len(spans) > 3 else "")


def check_intact(path: str | Path, meta: dict, handle, chunks: bool = True) -> None:
    """Refuse a store damaged on disk before anything reads it: every required array must open (its metadata
    readable), have the shape and dtype the store's metadata records, and - with `chunks` - hold stored data
    for every chunk of its own chunk grid. A chunk with no data reads as fill values (zeros, label -1), so this
    holds whether or not checksums are verified. Decided from each array's own chunk grid, chunk key encoding
    and sharding against the keys really present in its store (Zarr), or from the allocated chunks (HDF5)."""
    n = int(meta["num_samples"])
    for name in required_arrays(meta):
        try:
            arr = handle[name]
        except Exception as e:  # deleted or broken array metadata (zarr.json / HDF5 object header)
            raise damaged(path, f"array '{name}' is missing or its metadata cannot be read ({type(e).__name__})") from None
        want = tuple(meta["arrays"][name]["shape"]) if name in meta.get("arrays", {}) else None
        if name in ("labels", "sample_ids"):
            want = (n,)
        if want is not None and tuple(arr.shape) != want:
            raise damaged(path, f"array '{name}' has shape {tuple(arr.shape)}, its metadata says {want}")
        dtype = meta.get("arrays", {}).get(name, {}).get("dtype")
        if dtype is not None and np.dtype(arr.dtype) != np.dtype(dtype):
            raise damaged(path, f"array '{name}' holds {np.dtype(arr.dtype)}, its metadata says {dtype}")
        if not chunks:
            continue
        try:
            gaps = _h5_unwritten(arr) if store_format(path) == "h5" else _zarr_unwritten(arr)
        except StoreError:
            raise
        except Exception as e:
            raise damaged(path, f"the chunks of '{name}' cannot be listed ({type(e).__name__}: {e})") from None
        if gaps:
            raise damaged(path, f"'{name}' has no data on disk for rows {_rows(gaps)} (chunk files missing on "
                                f"disk; they would read as fill values)")


def _spans(starts: Iterable[int], size: int, n: int) -> list[tuple[int, int]]:
    """Merged (first row, end row) spans of chunks starting at `starts` with `size` rows each, clipped to n."""
    out: list[tuple[int, int]] = []
    for a in sorted(set(starts)):
        b = min(n, a + size)
        if out and out[-1][1] >= a:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _zarr_unwritten(arr) -> list[tuple[int, int]]:
    """Row spans of a Zarr array with no stored data: stored objects (chunks, or shards) absent from the store,
    and inside present shards the inner chunks their index marks empty."""
    from zarr.core.sync import sync

    md = arr.metadata
    if not arr.shape or 0 in arr.shape:
        return []
    prefix = f"{arr.path}/" if arr.path else ""

    async def listing():
        return {k async for k in arr.store.list_prefix(prefix)}

    present = sync(listing())
    grid = md.chunk_grid  # the stored objects' grid: shards when sharded
    outer = grid.chunk_shape
    sharding = next((c for c in getattr(md, "codecs", ()) if type(c).__name__ == "ShardingCodec"), None)
    inner = sharding.chunk_shape[0] if sharding is not None else outer[0]
    starts = []  # first rows of the unwritten pieces, each `inner` rows long
    for coords in grid.all_chunk_coords(arr.shape):
        first = coords[0] * outer[0]
        key = prefix + md.encode_chunk_key(coords)
        if key not in present:
            starts += range(first, first + outer[0], inner)
        elif sharding is not None:
            starts += [first + r for r in _empty_inner_rows(arr, sharding, key, outer)]
    return _spans(starts, inner, arr.shape[0])


def _empty_inner_rows(arr, sharding, key: str, outer: tuple[int, ...]) -> list[int]:
    """First rows (relative to the shard) of the inner chunks that a shard's index marks empty."""
    from zarr.abc.store import RangeByteRequest, SuffixByteRequest
    from zarr.codecs.sharding import ShardingCodecIndexLocation
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    per_shard = tuple(o // i for o, i in zip(outer, sharding.chunk_shape))
    size = sharding._shard_index_size(per_shard)
    where = (RangeByteRequest(0, size) if sharding.index_location == ShardingCodecIndexLocation.start
             else SuffixByteRequest(size))
    raw = sync(arr.store.get(key, prototype=default_buffer_prototype(), byte_range=where))
    if raw is None or len(raw) < size:
        return list(range(0, outer[0], sharding.chunk_shape[0]))  # too short to hold its index: all missing
    index = sync(sharding._decode_shard_index(raw, per_shard))
    empty = np.argwhere(~index.get_full_chunk_map())
    return sorted({int(c[0]) * sharding.chunk_shape[0] for c in empty})


def _h5_unwritten(ds) -> list[tuple[int, int]]:
    """Row spans of an HDF5 dataset with no allocated storage (they read as the fill value)."""
    if ds.shape == () or 0 in ds.shape:
        return []
    if ds.chunks is None:  # contiguous or compact: all or nothing
        return [] if ds.id.get_storage_size() > 0 else [(0, ds.shape[0])]
    grid = [-(-s // c) for s, c in zip(ds.shape, ds.chunks)]
    have = ds.id.get_num_chunks()
    if have >= int(np.prod(grid)):
        return []
    written = {ds.id.get_chunk_info(i).chunk_offset for i in range(have)}
    starts = []
    for coords in np.ndindex(*grid):
        offset = tuple(int(c) * s for c, s in zip(coords, ds.chunks))
        if offset not in written:
            starts.append(offset[0])
    return _spans(starts, ds.chunks[0], ds.shape[0])


__all__ = ["FORMAT", "VERSION", "READABLE_VERSIONS", "PAIR_KEYS", "RESUME_KEYS", "StoreArrays", "StoreError",
           "array_checksum", "check_labels", "chunk_checksum", "chunk_ranges", "dataset_key", "default_root", "differing",
           "model_key",
           "find_stores", "get", "check_intact", "damaged", "open_arrays", "required_arrays", "read_metadata", "safe_component", "staging_path",
           "store_format", "store_path", "token_arrays", "token_codec", "verify_store", "write_atomic"]
