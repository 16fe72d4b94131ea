"""Chunked, self-describing token stores (Zarr default, HDF5 optional), written crash-safely.

Logical layout (both formats):
    cls        (N, L, D)  float16|float32  token 0 of each tapped layer
    ap         (N, L, D)  float16|float32  mean of the patch tokens (prefix/register tokens excluded)
    labels     (N,)       int64            class index into metadata class_names (-1 = skipped image)
    sample_ids (N,)       str              source path / index of each row
Metadata: zarr group attributes / HDF5 root attribute `alfcache` (JSON), see `build_metadata`.

Crash safety: rows are written in chunk-aligned blocks. After a block is on disk its number and
checksum go into a progress manifest, replaced atomically. A rerun redoes only blocks not in the
manifest. Zarr is written in place (every zarr file write is atomic). HDF5 is never written
half-way: blocks are staged as .npz files and the .h5 file is built and renamed into place at the
end, so a crash cannot leave a half-valid HDF5 file.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import AlfError

FORMAT = "alfcache-store"
FORMAT_VERSION = 1
ENV_OUT = "ALF_FEATURES"
PROGRESS = "alf_progress.json"
# metadata keys that must agree for a rerun to continue (resume) an existing store
IDENTITY_KEYS = ("model.source_id", "model.fingerprint", "preprocessing", "taps", "arrays", "dtype",
                 "dataset.name", "dataset.fingerprint", "split", "num_samples", "chunk_rows", "format_version",
                 "extraction.autocast")


def default_out() -> Path:
    return Path(os.environ.get(ENV_OUT, "features"))


def safe_component(name: str) -> str:
    """A folder name from a user-supplied name: no separators, no '..', no leading dots."""
    out = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)
    out = out.strip(".-")
    return out or "unnamed"


def store_path(out: str | Path, dataset_slug: str, model_slug: str, split: str, fmt: str = "zarr") -> Path:
    if fmt not in ("zarr", "h5"):
        raise AlfError(f"unknown store format '{fmt}' (known: zarr, h5)")
    return Path(out) / safe_component(dataset_slug) / safe_component(model_slug) / f"{safe_component(split)}.{fmt}"


def chunk_rows_for(row_bytes: int, target_bytes: int = 8 << 20) -> int:
    """Rows per chunk so that one chunk of all arrays is about `target_bytes` (several MB: kind to NFS)."""
    rows = target_bytes // max(1, row_bytes)
    return int(min(8192, max(16, rows)))


def _get(meta: dict, dotted: str):
    cur = meta
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def identity_mismatch(old: dict, new: dict) -> list[str]:
    return [k for k in IDENTITY_KEYS if json.dumps(_get(old, k), sort_keys=True) != json.dumps(_get(new, k), sort_keys=True)]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def os_error(path: Path, e: OSError) -> AlfError | None:
    """The one-line error for an OS-level write failure, or None if it is not one we explain."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full_error(path, e.strerror or "no space left")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return AlfError(f"cannot write to '{e.filename or path}': {e.strerror} (choose another --out)")
    return None


def chunk_checksum(arrays: dict[str, np.ndarray], labels: np.ndarray) -> str:
    """Checksum of one chunk (format spec, also implemented by probes.features.chunk_checksum):
    sha256 over, for every token array sorted by name, its name (utf-8) then its C-order bytes; then the
    int64 labels' bytes; first 32 hex digits."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()[:32]


def array_specs(meta: dict) -> dict[str, dict]:
    """Token arrays of a store: name -> {"shape": [N, ...], "dtype"} (all chunked along N)."""
    return meta["arrays"]


def disk_full_error(path: Path, detail: str) -> AlfError:
    return AlfError(f"disk full while writing '{path}' ({detail}); the store is valid up to the last "
                    f"durable chunk - free space and rerun the same command to resume")


# ----------------------------------------------------------------------------------------- lock
@contextmanager
def store_lock(path: Path, break_lock: bool = False):
    """Exclusive writer lock beside the store (`<store>.lock`), naming its holder.

    A lock left by a dead process on this host is stale: it is taken over with a warning.
    """
    import logging

    log = logging.getLogger(__name__)
    lock = path.with_name(path.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        err = os_error(lock.parent, e)
        if err is None:
            raise
        raise err from None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            stale = holder.get("host") == me["host"] and not _pid_alive(holder.get("pid"))
            if stale or break_lock:
                log.warning("removing %s lock on %s held by pid %s on %s since %s",
                            "stale" if stale else "forcibly", path, holder.get("pid"), holder.get("host"),
                            holder.get("since"))
                lock.unlink(missing_ok=True)
                continue
            raise AlfError(f"store '{path}' is being written by pid {holder.get('pid')} on {holder.get('host')} "
                           f"since {holder.get('since')}; wait for it, or pass --break-lock if that process is gone")
        except OSError as e:
            err = os_error(lock.parent, e)
            if err is None:
                raise
            raise err from None
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _read_lock(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {"pid": None, "host": "?", "since": "?"}


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------- metadata
def read_metadata(path: str | Path) -> dict:
    """The metadata of a store of either format (plain zarr / h5py underneath)."""
    path = Path(path)
    if not path.exists():
        raise AlfError(f"no store at '{path}'")
    try:
        if path.suffix == ".h5":
            import h5py

            with h5py.File(path, "r") as f:
                meta = json.loads(f.attrs["alfcache"])
        else:
            import zarr

            meta = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception as e:
        raise AlfError(f"'{path}' is not a readable alfcache store ({type(e).__name__})") from None
    if meta.get("format") != FORMAT:
        raise AlfError(f"'{path}' is not an alfcache store (no '{FORMAT}' metadata)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AlfError(f"store '{path}' has format version {meta.get('format_version')}; "
                       f"this alfcache reads version {FORMAT_VERSION}")
    return meta


def find_stores(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.rglob("*.zarr") if (p / "zarr.json").is_file()]
    found += [p for p in root.rglob("*.h5") if p.is_file()]
    return sorted(found)


# ----------------------------------------------------------------------------------------- sinks
@dataclass
class Progress:
    done: dict[int, str]  # chunk index -> checksum
    skipped: list[str]


class _Sink:
    """Shared manifest logic; subclasses put chunk data somewhere durable."""

    progress_file: Path

    def __init__(self, path: Path, meta: dict, rank: int = 0, world: int = 1):
        self.path, self.meta = path, meta
        self.rank, self.world = rank, world
        self.n = meta["num_samples"]
        self.rows = meta["chunk_rows"]
        self.num_chunks = (self.n + self.rows - 1) // self.rows
        self.progress = Progress({}, [])
        self._failed: AlfError | None = None  # first write failure; later writes are refused with it

    def _progress_name(self) -> str:
        # one manifest per writer: ranks of a distributed run never write the same file
        return PROGRESS if self.world == 1 else f"alf_progress.rank{self.rank}.json"

    def chunk_range(self, k: int) -> tuple[int, int]:
        return k * self.rows, min(self.n, (k + 1) * self.rows)

    def pending(self) -> list[int]:
        return [k for k in range(self.num_chunks) if k not in self.progress.done]

    def _progress_files(self) -> list[Path]:
        return sorted(self.progress_file.parent.glob("alf_progress*.json"))

    def _load_progress(self) -> None:
        """Merge every writer's manifest: a chunk is done if any writer recorded it."""
        done, skipped, mine = {}, [], {}
        for f in self._progress_files():
            raw = json.loads(f.read_text())
            part = {int(k): v for k, v in raw["done"].items()}
            done.update(part)
            skipped += raw.get("skipped", [])
            if f == self.progress_file:
                mine = part
        self.progress = Progress(done, sorted(set(skipped)))
        self._mine = dict(mine) if self.world > 1 else done

    def reload(self) -> None:
        self._load_progress()

    def _save_progress(self) -> None:
        own = self._mine if self.world > 1 else self.progress.done
        _atomic_write_text(self.progress_file, json.dumps(
            {"done": {str(k): v for k, v in sorted(own.items())}, "skipped": self.progress.skipped}))

    def _remove_progress(self) -> None:
        for f in self._progress_files():
            f.unlink(missing_ok=True)

    def write_chunk(self, k: int, arrays: dict[str, np.ndarray], labels: np.ndarray, ids: list[str],
                    skipped: list[str]) -> None:
        if set(arrays) != set(array_specs(self.meta)):
            raise AlfError(f"chunk {k} has arrays {sorted(arrays)}, the store expects {sorted(array_specs(self.meta))}")
        if self._failed is not None:  # a full disk stays full: write nothing past the first failure
            raise self._failed
        try:
            self._put(k, arrays, labels, ids)
            self.progress.done[k] = chunk_checksum(arrays, labels)
            if self.world > 1:
                self._mine[k] = self.progress.done[k]
            self.progress.skipped += skipped
            self._save_progress()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self._failed = disk_full_error(self.path, f"chunk {k}")
            else:
                self._failed = os_error(self.path, e)
                if self._failed is None:
                    raise
            raise self._failed from None

    def finalize_meta(self) -> dict:
        meta = dict(self.meta)
        meta["complete"] = True
        meta["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        meta["skipped"] = sorted(self.progress.skipped)
        meta["chunk_checksums"] = [self.progress.done[k] for k in range(self.num_chunks)]
        return meta


def token_codec():
    """Blosc lz4 + bit-shuffle for token arrays: on float16 tokens it compresses as well as zstd and decodes
    1.3-2.7x faster (benchmarks/bench_store.py); readers need nothing but zarr (the codec is in the metadata)."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")


class ZarrSink(_Sink):
    def __init__(self, path: Path, meta: dict, *, create: bool, rank: int = 0, world: int = 1):
        import zarr

        super().__init__(path, meta, rank, world)
        self._mine = {}
        self.progress_file = path / self._progress_name()
        n = meta["num_samples"]
        if create:
            g = zarr.open_group(str(path), mode="w")
            for name, spec in array_specs(meta).items():
                shape = tuple(spec["shape"])
                parent, _, leaf = name.rpartition("/")
                grp = g.require_group(parent) if parent else g
                grp.create_array(leaf, shape=shape, chunks=(self.rows, *shape[1:]), dtype=spec["dtype"], fill_value=0,
                                 compressors=token_codec())
            g.create_array("labels", shape=(n,), chunks=(self.rows,), dtype="int64", fill_value=-1)
            g.create_array("sample_ids", shape=(n,), chunks=(self.rows,), dtype=str)
            g.attrs.update(meta)
            self._save_progress()
        self.group = zarr.open_group(str(path), mode="r+")
        self._load_progress()

    def _put(self, k, arrays, labels, ids):
        a, b = self.chunk_range(k)
        for name, arr in arrays.items():
            self.group[name][a:b] = arr
        self.group["labels"][a:b] = labels
        self.group["sample_ids"][a:b] = np.asarray(ids, dtype=str)

    def finalize(self) -> None:
        self.group.attrs.update(self.finalize_meta())
        self._remove_progress()


class H5Sink(_Sink):
    """Stages chunks as .npz in `<store>.partial/`, then builds the .h5 and renames it into place."""

    def __init__(self, path: Path, meta: dict, *, create: bool, rank: int = 0, world: int = 1):
        super().__init__(path, meta, rank, world)
        self._mine = {}
        self.staging = path.with_name(path.name + ".partial")
        self.progress_file = self.staging / self._progress_name()
        if create:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True)
            _atomic_write_text(self.staging / "meta.json", json.dumps(meta))
            self._save_progress()
        self._load_progress()

    def _put(self, k, arrays, labels, ids):
        final = self.staging / f"chunk_{k:06d}.npz"
        tmp = self.staging / f"chunk_{k:06d}.tmp.npz"
        np.savez(tmp, labels=labels, sample_ids=np.asarray(ids, dtype=str),
                 **{"tok:" + name.replace("/", "|"): arr for name, arr in arrays.items()})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def finalize(self) -> None:
        import h5py

        meta = self.finalize_meta()
        n = meta["num_samples"]
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with h5py.File(tmp, "w") as f:
                ds = {}
                for name, spec in array_specs(meta).items():
                    shape = tuple(spec["shape"])
                    ds[name] = f.create_dataset(name, shape=shape, dtype=spec["dtype"], compression="lzf",
                                                chunks=(min(self.rows, n), *shape[1:]))
                ds["labels"] = f.create_dataset("labels", shape=(n,), dtype="int64")
                ds["sample_ids"] = f.create_dataset("sample_ids", shape=(n,), dtype=h5py.string_dtype())
                for k in range(self.num_chunks):
                    a, b = self.chunk_range(k)
                    with np.load(self.staging / f"chunk_{k:06d}.npz") as z:
                        for name in array_specs(meta):
                            ds[name][a:b] = z["tok:" + name.replace("/", "|")]
                        ds["labels"][a:b] = z["labels"]
                        ds["sample_ids"][a:b] = z["sample_ids"].astype(object)
                f.attrs["alfcache"] = json.dumps(meta)
                for key in ("format", "format_version", "dtype", "split", "num_samples", "num_layers", "width"):
                    f.attrs[key] = meta[key]
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full_error(self.path, "building the final .h5") from None
            raise
        shutil.rmtree(self.staging, ignore_errors=True)


def attach_sink(path: Path, rank: int, world: int) -> _Sink:
    """A further writer (rank > 0 of a distributed run) on a store that rank 0 created or resumed."""
    if path.suffix == ".h5":
        meta = json.loads((path.with_name(path.name + ".partial") / "meta.json").read_text())
        return H5Sink(path, meta, create=False, rank=rank, world=world)
    return ZarrSink(path, read_metadata(path), create=False, rank=rank, world=world)


def open_sink(path: Path, meta: dict, *, overwrite: bool, world: int = 1) -> _Sink | None:
    """Create, resume or (when complete and not overwriting) skip a store. None means skip.
    With world > 1 this is rank 0's sink; the other ranks attach with `attach_sink`."""
    import functools

    fmt = "h5" if path.suffix == ".h5" else "zarr"
    cls = functools.partial(H5Sink if fmt == "h5" else ZarrSink, rank=0, world=world)
    staged = path.with_name(path.name + ".partial") if fmt == "h5" else path
    if overwrite:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        if fmt == "h5":
            shutil.rmtree(staged, ignore_errors=True)
        return cls(path, meta, create=True)
    if path.exists():
        old = read_metadata(path)
        if old.get("complete"):
            diff = identity_mismatch(old, meta)
            if diff:
                raise AlfError(f"store '{path}' holds a different extraction ({', '.join(diff)} differ); "
                               f"use --overwrite to replace it or --out for another location")
            return None
        if fmt == "zarr" and not any(path.glob("alf_progress*.json")):
            raise AlfError(f"store '{path}' is incomplete and has no progress manifest; rerun with --overwrite")
    if fmt == "h5" and (staged / "meta.json").is_file():
        old = json.loads((staged / "meta.json").read_text())
    elif fmt == "zarr" and path.exists():
        old = read_metadata(path)
    else:
        return cls(path, meta, create=True)
    diff = identity_mismatch(old, meta)
    if diff:
        raise AlfError(f"store '{path}' was started with a different extraction ({', '.join(diff)} differ); "
                       f"use --overwrite to start again")
    # resume with the original metadata (created_at and all) so the result equals an uninterrupted run
    return cls(path, old, create=False)
