"""The store format: the one contract between extraction (`alfcache`) and probing (`probes`).

Everything a reader or a writer must agree on lives here and nowhere else: where a store lives (a local folder,
or object storage: s3://bucket/prefix, see "object storage" below), its two on-disk formats (Zarr directory, HDF5
file), the metadata keys that identify it, which versions can be read,
the chunk checksum, label rules, discovery and verification. It imports only numpy, zarr, h5py and the
standard library (and, when a location is a URL, universal_pathlib and fsspec's filesystem for it: the `s3`
extra), so `probes` can use it without pulling in any backbone library.

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

import contextlib
import hashlib
import json
import os
import re
import shutil
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
    """Where stores live unless told otherwise: $ALF_FEATURES or ./features (a folder or an s3:// URL)."""
    return location(os.environ.get(ENV_ROOT, "features"))


def safe_component(name: str) -> str:
    """A folder name from a user-supplied name: no separators, no '..', no leading dots."""
    out = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)
    out = out.strip(".-")
    return out or "unnamed"


def store_path(root: str | Path, dataset_slug: str, model_slug: str, split: str, fmt: str = "zarr") -> Path:
    """`<root>/<dataset>/<model>/<split>.<fmt>`, every component sanitised (stores always land under root);
    root may be a folder or an object-storage URL (s3://bucket/prefix)."""
    if fmt not in SUFFIXES.values():
        raise StoreError(f"unknown store format '{fmt}' (known: {', '.join(SUFFIXES.values())})")
    if fmt == "h5" and is_remote(root):
        raise StoreError(f"HDF5 stores live on local disks only; use the zarr format for '{root}'")
    return location(root) / safe_component(dataset_slug) / safe_component(model_slug) / f"{safe_component(split)}.{fmt}"


def store_format(path: str | Path) -> str:
    """'zarr' or 'h5', from the suffix (on object storage: zarr only)."""
    fmt = SUFFIXES.get(location(path).suffix)
    if fmt is None:
        raise StoreError(f"'{path}' is not a store path (expected a .zarr folder or an .h5 file)")
    if fmt == "h5" and is_remote(path):
        raise StoreError(f"'{path}': HDF5 stores live on local disks only; object storage holds zarr stores")
    return fmt


def staging_path(path: Path) -> Path:
    """HDF5 stores are built in `<store>.partial/` and renamed into place when complete."""
    return path.with_name(path.name + ".partial")


def find_stores(root: str | Path) -> list[Path]:
    """Every store-shaped path under root (a .zarr folder or an .h5 file), readable or not."""
    if is_remote(root):
        return _find_remote_stores(root)
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.rglob("*.zarr") if p.is_dir()] + [p for p in root.rglob("*.h5") if p.is_file()]
    return sorted(found, key=str)  # the order of their names, as on object storage


# ------------------------------------------------------------------------------------------ files
def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write a whole file so that a reader sees the old content or the new one, never a torn one: a temporary
    file beside it, fsync, rename. Every file the project writes (manifests, results, summaries) goes this way.
    On object storage one PUT does the same: the object is replaced whole or not at all."""
    if is_remote(path):
        location(path).write_bytes(data.encode() if isinstance(data, str) else data)
        return
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

    return dict(zarr.open_group(zarr_store(path, read_only=True), mode="r", zarr_format=3).attrs)


def read_metadata(path: str | Path) -> dict:
    """The metadata of a store of either format, checked: an alfcache store of a readable version."""
    path = location(path)
    if not path.exists():
        raise StoreError(f"no store at '{path}'")
    try:
        meta = _raw_metadata(path)
    except StoreError:
        raise
    except Exception as e:  # missing / broken zarr.json, truncated .h5, unreadable attribute
        _raise_access(path, e)
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
        self._open: dict = {}  # arrays opened once (on object storage each opening is a request)

    def __getitem__(self, name: str):
        if name not in self._open:
            self._open[name] = self.handle[name]
        return self._open[name]

    def __contains__(self, name: str) -> bool:
        try:
            self.handle[name]
        except KeyError:
            return False
        return True

    def ids(self, a: int = 0, b: int | None = None) -> list[str]:
        ds = self["sample_ids"]
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
    path = location(path)
    meta = read_metadata(path) if meta is None else meta
    try:
        if store_format(path) == "h5":
            import h5py

            handle = h5py.File(path, "r")
        else:
            import zarr

            handle = zarr.open_group(zarr_store(path, read_only=True), mode="r", zarr_format=3)
    except Exception as e:
        _raise_access(path, e)
        raise damaged(path, f"it cannot be opened ({type(e).__name__})") from None
    return StoreArrays(path, handle, meta)


def mirror_store(path, cache_dir, meta: dict | None = None) -> Path:
    """A complete store on object storage copied once into `cache_dir` (reused while unchanged); local stores are
    returned as they are. The read-through cache of `alf probe --cache-dir`."""
    if cache_dir is None:
        raise TypeError("mirror_store needs a cache_dir")
    if not is_remote(path):
        return Path(path)
    meta = read_metadata(path) if meta is None else meta
    if not meta.get("complete"):
        raise StoreError(f"store '{path}' is incomplete (extraction did not finish); it is not cached")
    try:
        return _mirror(path, cache_dir, meta)
    except Exception as e:
        _raise_access(path, e)
        raise


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


def prefetched(fn, items, ahead: int):
    """fn(item) for each item, in order, with up to `ahead` calls running in threads ahead of the consumer (reads
    from object storage wait on the network: several requests in flight hide that); ahead <= 1: one at a time."""
    items = list(items)
    if ahead <= 1 or len(items) <= 1:
        for it in items:
            yield fn(it)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="alf-read-ahead") as pool:
        futures = deque()
        rest = iter(items)
        for it in rest:
            futures.append(pool.submit(fn, it))
            if len(futures) >= ahead:
                break
        while futures:
            done = futures.popleft().result()
            nxt = next(rest, None)
            if nxt is not None:
                futures.append(pool.submit(fn, nxt))
            yield done


def read_ahead(path) -> int:
    """Chunk reads to keep in flight for a store: $ALF_READ_AHEAD (default 8) on object storage, 1 on disk."""
    return int(os.environ.get("ALF_READ_AHEAD", "8")) if is_remote(path) else 1


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
def verify_store(path: str | Path, progress: bool = False, opened: StoreArrays | None = None) -> int:
    """Re-read every chunk of a complete store (every token array, labels and, from version 2, sample ids) and
    compare its checksum; also the projection arrays. Names the first bad chunk. Returns the number of chunks.
    `opened`: this store already open and checked intact (a reader's own handle): its metadata and arrays are
    used instead of opening and listing the store again (on object storage each is a request)."""
    path = location(path)
    meta = read_metadata(path) if opened is None else opened.meta
    sums = meta.get("chunk_checksums")
    if not meta.get("complete") or sums is None:
        raise StoreError(f"store '{path}' is incomplete (extraction did not finish); rerun the extraction to "
                         f"resume it, or pass --allow-incomplete")
    version = int(meta["format_version"])
    names = token_arrays(meta)
    ranges = list(chunk_ranges(meta))
    if len(ranges) != len(sums):
        raise damaged(path, f"{len(sums)} checksums for {len(ranges)} chunks")
    with open_arrays(path, meta) if opened is None else contextlib.nullcontext(opened) as arrays:
        if opened is None:
            check_intact(path, meta, arrays.handle)

        def load(rng):
            k, a, b = rng
            try:
                block = {name: np.asarray(arrays[name][a:b]) for name in names}
                return block, np.asarray(arrays["labels"][a:b]), (arrays.ids(a, b) if version >= 2 else None)
            except Exception as e:
                _raise_access(path, e)
                raise damaged(path, f"chunk {k} (rows {a}-{b - 1}) cannot be read ({type(e).__name__}); "
                                    f"it is corrupted") from None

        it = zip(ranges, prefetched(load, ranges, read_ahead(path)))
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=len(ranges), desc=f"verify {path.name}", unit="chunk", leave=False)
        for (k, a, b), (block, labels, ids) in it:
            if chunk_checksum(block, labels, ids, version) != sums[k]:
                raise damaged(path, f"chunk {k} (rows {a}-{b - 1}) fails its checksum (the data was changed or "
                                    f"corrupted on disk)")
        proj = meta.get("projection")
        if proj:
            for name in PROJECTION:
                try:
                    got = array_checksum(np.asarray(arrays[name][...]))
                except Exception as e:
                    _raise_access(path, e)
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


def _raise_access(path, exc: BaseException) -> None:
    """A store on object storage that cannot be reached or read (credentials, bucket, network) is not damaged:
    raise the one line that says what is wrong with the access instead."""
    if path is not None and is_remote(path):
        msg = explain(exc, path=path)
        if msg is not None:
            raise StoreError(f"{msg} [{path}]") from None


def access_error(path, exc: BaseException) -> None:
    """Public form of the access check for readers (`probes`): raises the one-line StoreError, or returns."""
    _raise_access(path, exc)


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
    n, recorded = int(meta["num_samples"]), meta["arrays"]  # (required_arrays needs "arrays" too)
    for name in required_arrays(meta):
        try:
            arr = handle[name]
        except Exception as e:  # deleted or broken array metadata (zarr.json / HDF5 object header)
            _raise_access(path, e)
            raise damaged(path, f"array '{name}' is missing or its metadata cannot be read ({type(e).__name__})") from None
        want = (n,) if name in ("labels", "sample_ids") else (
            tuple(recorded[name]["shape"]) if name in recorded else None)  # (projection arrays: no record)
        if want is not None and tuple(arr.shape) != want:
            raise damaged(path, f"array '{name}' has shape {tuple(arr.shape)}, its metadata says {want}")
        dtype = recorded.get(name, {}).get("dtype")
        if dtype is not None and np.dtype(arr.dtype) != np.dtype(dtype):
            raise damaged(path, f"array '{name}' holds {np.dtype(arr.dtype)}, its metadata says {dtype}")
        if not chunks:
            continue
        try:
            gaps = _h5_unwritten(arr) if store_format(path) == "h5" else _zarr_unwritten(arr)
        except StoreError:
            raise
        except Exception as e:
            _raise_access(path, e)
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



# ------------------------------------------------------------------------------------------ object storage
# Stores on object storage (s3://, and gs:// / az:// where fsspec has a filesystem for them). A store location is
# a local `Path` or, for a URL, a `UPath` (universal_pathlib over fsspec): the same path operations (`/`, `.name`,
# `.parent`, `.exists()`, `.glob()`, `.read_text()`) work on both, so the writer, the reader, the manifest and
# discovery take either. Zarr v3 reads and writes the same format through fsspec; HDF5 stores stay on local disks.
# - No renames: every object is one PUT, which a reader sees whole or not at all (`write_atomic`); a chunk's
#   objects are written before its manifest entry, so a killed writer resumes at its first chunk not recorded.
# - Listings are not cached (`use_listings_cache=False`): a reader must see what another machine just wrote.
# - Transient failures are retried by botocore with back-off (ALF_S3_RETRIES attempts, default 8); what still
#   fails becomes one line (`explain`): no credentials, no bucket, access denied, the service unreachable.
# Credentials and the endpoint come from the standard places (AWS_* environment variables, ~/.aws/config and
# credentials, instance roles; AWS_ENDPOINT_URL for S3-compatible servers), never from the command line.
# The writer's side (put-if-absent locks, deleting a store, the write test) is in `remote.py`.
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
LOCAL_PROTOCOLS = ("", "file", "local")
ENV_RETRIES = "ALF_S3_RETRIES"


def is_remote(path) -> bool:
    """Is this a location on object storage (a URL other than file://, or a UPath over a remote filesystem)?"""
    proto = getattr(path, "protocol", None)
    if proto is not None and not isinstance(path, Path):
        return proto not in LOCAL_PROTOCOLS
    s = str(path)
    return bool(URL.match(s)) and not s.startswith("file://")


def protocol_of(url) -> str:
    """The URL's scheme in lower case (`s3` of `S3://bucket/a://b`): what picks the filesystem's options."""
    from urllib.parse import urlsplit

    return urlsplit(str(url)).scheme


def storage_options(protocol: str) -> dict:
    """fsspec options for a protocol: fresh listings and botocore's retries with back-off for S3."""
    if protocol in ("s3", "s3a"):
        attempts = int(os.environ.get(ENV_RETRIES, "8"))
        return {"use_listings_cache": False,
                "config_kwargs": {"retries": {"max_attempts": attempts, "mode": "standard"},
                                  "connect_timeout": 5, "read_timeout": 60}}
    return {}


def location(path):
    """A local Path, or a UPath for a URL (s3://bucket/prefix)."""
    if not is_remote(path):
        s = str(path)
        return Path(s[len("file://"):] if s.startswith("file://") else s) if not isinstance(path, Path) else path
    if not isinstance(path, str):
        return path  # already a UPath
    proto = protocol_of(path)
    try:
        from upath import UPath

        return UPath(str(path), **storage_options(proto))
    except ImportError as e:
        raise StoreError(f"'{path}' is on object storage, which needs {e.name or 'universal_pathlib'} and the "
                         f"filesystem for {proto}:// (pip install 'alfcache[s3]')") from None
    except ValueError as e:  # fsspec has no filesystem for this protocol
        raise StoreError(f"'{path}': {e}") from None


def zarr_store(path, read_only: bool):
    """What zarr opens: the local folder as text, or an fsspec store over the same filesystem options."""
    if not is_remote(path):
        return str(path)
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(str(path), storage_options=storage_options(protocol_of(path)), read_only=read_only)


def _find_remote_stores(root, max_depth: int = 6) -> list:
    """Every `*.zarr` prefix under a remote root, in the order of their names."""
    root = location(root)
    return [root / name for name in _store_names(root.fs, root.path, max_depth)]


def _store_names(fs, base: str, max_depth: int = 6) -> list[str]:
    """The names (relative to base) of the `*.zarr` folders under base on an fsspec filesystem, up to max_depth
    folders down, sorted: by delimiter listings that never descend into a store (a store holds thousands of
    chunk objects; the root's listing stays one request per folder)."""
    base = base.rstrip("/")
    found, todo = [], [(base, 0)]
    while todo:
        key, depth = todo.pop()
        try:
            entries = fs.ls(key, detail=True)
        except FileNotFoundError:
            continue
        for e in entries:
            name = e["name"].rstrip("/")
            if e.get("type") != "directory":
                continue
            if name.endswith(".zarr"):
                found.append(name[len(base) + 1:])
            elif depth < max_depth:
                todo.append((name, depth + 1))
    return sorted(found)


def size_of(path) -> int:
    """Bytes stored under a store's prefix (or in a local file / folder)."""
    p = location(path)
    if not is_remote(p):
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return int(p.fs.du(p.path))  # (fsspec's du totals by default)


def _mirror(path, cache_dir, meta: dict) -> Path:
    """A local copy of a complete remote store under `cache_dir`, fetched once (all objects, many requests in
    flight) and reused while the store is unchanged: the copy is named by the store's URL and identified by its
    chunk checksums and creation time, so a store re-extracted in the bucket is fetched again. The copy is
    built beside its final name and renamed into place, so a killed fetch leaves no half copy in use."""
    p = location(path)
    ident = json.dumps([str(p), meta.get("created_at"), meta.get("chunk_checksums")])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    dest = Path(cache_dir) / f"{digest}-{p.name}"
    if (dest / "zarr.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".partial{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        p.fs.get(p.path + "/", str(tmp) + "/", recursive=True)  # (a UPath's path has no trailing slash)
        if not (tmp / "zarr.json").is_file():  # the store went away meanwhile: no empty copy is put in place
            raise StoreError(f"store '{path}' could not be copied to '{cache_dir}': its zarr.json is gone")
        for stale in tmp.glob("alf_progress*.json"):
            stale.unlink()
        if dest.exists():  # a copy without its zarr.json (emptied by hand or a disk fault): not a copy to keep
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except (OSError, StoreError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (dest / "zarr.json").is_file():  # lost a race to an identical copy
            return dest
        raise
    return dest


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


REMOTE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "adlfs", "obstore", "urllib3")


def explain(exc: BaseException, remote: bool = True, path=None) -> str | None:
    """One line for an object-storage failure (None when it is not one): the cause and the way out. With
    remote=False (the caller does not know where the error came from) only errors raised by an object-storage
    client library count."""
    if not remote and not any(type(e).__module__.split(".")[0] in REMOTE_MODULES for e in _chain(exc)):
        return None
    names = {b.__name__ for e in _chain(exc) for b in type(e).__mro__}
    said = lambda *words: any(w in str(e) for e in _chain(exc) for w in words)  # noqa: E731
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the S3 endpoint"
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return ("object storage: no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                "AWS_PROFILE / ~/.aws/credentials, or run where an instance role applies)")
    if said("NoSuchBucket") or any("bucket does not exist" in str(e).lower() for e in _chain(exc)):
        # the service names the bucket in its answer (botocore's ClientError.response); else the URL does
        answers = (getattr(e, "response", None) for e in _chain(exc))
        name = next((a["Error"]["BucketName"] for a in answers if isinstance(a, dict)
                     and "BucketName" in a.get("Error", ())), None)
        if name is None and path is not None and is_remote(path):
            name = str(path).partition("://")[2].partition("/")[0]
        which = f" '{name}'" if name else ""
        return f"object storage: the bucket{which} does not exist (create it, or check the URL and {endpoint})"
    # (botocore's ConnectTimeoutError is a ConnectionError whose message says "Connect timeout": the last rule)
    if names & {"EndpointConnectionError", "ClientConnectorError", "ConnectionClosedError",
                "ReadTimeoutError", "ServerDisconnectedError", "FSTimeoutError"} or (
            "ConnectionError" in names and said("Connect")):
        attempts = os.environ.get(ENV_RETRIES, "8")
        return (f"object storage unreachable at {endpoint} (gave up after {attempts} attempts with back-off); "
                f"everything written before is kept - rerun the same command to resume")
    if names & {"PermissionError"} or said("AccessDenied", "Forbidden"):
        target = next((e.filename for e in _chain(exc) if getattr(e, "filename", None)), None)
        where = f" '{target}'" if target else ""
        return (f"object storage: access denied{where} (the credentials may not read or write there; check the "
                f"bucket policy or use a bucket you may write)")
    if said("InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return "object storage: the credentials were refused (InvalidAccessKeyId / SignatureDoesNotMatch)"
    return None

__all__ = ["FORMAT", "VERSION", "READABLE_VERSIONS", "PAIR_KEYS", "RESUME_KEYS", "StoreArrays", "StoreError",
           "array_checksum", "check_labels", "chunk_checksum", "chunk_ranges", "dataset_key", "default_root", "differing",
           "model_key",
           "find_stores", "get", "check_intact", "damaged", "open_arrays", "required_arrays", "read_metadata", "safe_component", "staging_path",
           "store_format", "store_path", "access_error", "prefetched", "read_ahead", "explain", "size_of", "storage_options", "zarr_store", "is_remote", "location", "mirror_store", "token_arrays", "token_codec", "verify_store", "write_atomic"]
