"""Writing a store crash-safely, chunk by chunk (Zarr in place, HDF5 staged then renamed).

Rows are written in chunk-aligned blocks. When a block is on disk its number and checksum go into the progress
manifest (`manifest.py`), so a rerun redoes only blocks not recorded. Zarr is written in place (every Zarr file
write is atomic, and every chunk file is written even when it holds only fill values, so a missing file always
means missing data). HDF5 is never written half-way: blocks are staged as .npz files and the .h5 file is built
and renamed into place at the end. After the first write failure (a full disk) a sink refuses every later chunk,
so no chunk lands past a hole.
"""
from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .errors import AlfError, disk_full_error, os_error
from .format import (PROJECTION, StoreError, chunk_checksum, differing, RESUME_KEYS, is_remote, read_metadata,
                     staging_path, store_format, token_arrays, token_codec, write_atomic)
from .locks import check_held
from .format import explain, zarr_store
from .remote import remove_tree
from .manifest import Manifest, Progress


def chunk_rows_for(row_bytes: int, target_bytes: int = 8 << 20) -> int:
    """Rows per chunk so that one chunk of all arrays is about `target_bytes` (several MB: kind to NFS)."""
    rows = target_bytes // max(1, row_bytes)
    return int(min(8192, max(16, rows)))


class Sink:
    """Chunk bookkeeping shared by both formats; subclasses put chunk data somewhere durable (`_put`)."""

    def __init__(self, path: Path, meta: dict, manifest_dir: Path, rank: int = 0, world: int = 1):
        self.path, self.meta = path, meta
        self.rank, self.world = rank, world
        self.n = meta["num_samples"]
        self.rows = meta["chunk_rows"]
        self.num_chunks = (self.n + self.rows - 1) // self.rows
        self.manifest = Manifest(manifest_dir, rank, world)
        self.progress = Progress()
        self._failed: AlfError | None = None  # first write failure; later writes are refused with it

    def chunk_range(self, k: int) -> tuple[int, int]:
        return k * self.rows, min(self.n, (k + 1) * self.rows)

    def pending(self) -> list[int]:
        return [k for k in range(self.num_chunks) if k not in self.progress.done]

    def reload(self) -> None:
        self.progress = self.manifest.load()

    def write_chunk(self, k: int, arrays: dict[str, np.ndarray], labels: np.ndarray, ids: list[str],
                    skipped: list[str]) -> None:
        if set(arrays) != set(token_arrays(self.meta)):
            raise AlfError(f"chunk {k} has arrays {sorted(arrays)}, the store expects {token_arrays(self.meta)}")
        if self._failed is not None:  # a full disk stays full: write nothing past the first failure
            raise self._failed
        try:
            self._put(k, arrays, labels, ids)
            checksum = chunk_checksum(arrays, labels, ids, self.meta["format_version"])
            check_held(self.path)  # still this store's writer (object storage: the lock can be taken over)
            self.manifest.record(k, checksum, skipped)
            self.progress.done[k] = checksum
            self.progress.skipped += skipped
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self._failed = disk_full_error(self.path, f"chunk {k}")
            else:
                self._failed = os_error(self.path, e)
                if self._failed is None:
                    raise
            raise self._failed from None
        except AlfError as e:
            self._failed = e
            raise
        except Exception as e:  # object storage: unreachable after the retries, access denied, ...
            msg = explain(e) if is_remote(self.path) else None
            if msg is None:
                raise
            self._failed = AlfError(f"writing chunk {k} of '{self.path}': {msg}")
            raise self._failed from None

    def finalize_meta(self) -> dict:
        meta = dict(self.meta)
        meta["complete"] = True
        meta["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        meta["skipped"] = sorted(set(self.progress.skipped))
        meta["chunk_checksums"] = [self.progress.done[k] for k in range(self.num_chunks)]
        return meta

    def _put(self, k, arrays, labels, ids):
        raise NotImplementedError

    def finalize(self) -> None:
        raise NotImplementedError


def _write_empty_chunks():
    import zarr

    return zarr.config.set({"array.write_empty_chunks": True})


class ZarrSink(Sink):
    def __init__(self, path: Path, meta: dict, *, create: bool, rank: int = 0, world: int = 1,
                 extras: dict[str, np.ndarray] | None = None):
        import zarr

        super().__init__(path, meta, path, rank, world)
        n = meta["num_samples"]
        if create:
            g = zarr.open_group(zarr_store(path, read_only=False), mode="w")
            for name, spec in meta["arrays"].items():
                shape = tuple(spec["shape"])
                parent, _, leaf = name.rpartition("/")
                grp = g.require_group(parent) if parent else g
                grp.create_array(leaf, shape=shape, chunks=(self.rows, *shape[1:]), dtype=spec["dtype"],
                                 fill_value=0, compressors=token_codec())
            g.create_array("labels", shape=(n,), chunks=(self.rows,), dtype="int64", fill_value=-1)
            g.create_array("sample_ids", shape=(n,), chunks=(self.rows,), dtype=str)
            for name, arr in (extras or {}).items():  # small, not per sample: one chunk
                parent, _, leaf = name.rpartition("/")
                grp = g.require_group(parent) if parent else g
                grp.create_array(leaf, shape=arr.shape, dtype=arr.dtype, fill_value=0)[...] = arr
            g.attrs.update(meta)
            self.manifest.save()
        self.group = zarr.open_group(zarr_store(path, read_only=False), mode="r+")
        self.reload()

    def _put(self, k, arrays, labels, ids):
        a, b = self.chunk_range(k)
        with _write_empty_chunks():
            for name, arr in arrays.items():
                self.group[name][a:b] = arr
            self.group["labels"][a:b] = labels
            self.group["sample_ids"][a:b] = np.asarray(ids, dtype=str)

    def finalize(self) -> None:
        self.group.attrs.update(self.finalize_meta())
        self.manifest.remove()


class H5Sink(Sink):
    """Stages chunks as .npz in `<store>.partial/`, then builds the .h5 and renames it into place."""

    def __init__(self, path: Path, meta: dict, *, create: bool, rank: int = 0, world: int = 1,
                 extras: dict[str, np.ndarray] | None = None):
        self.staging = staging_path(path)
        super().__init__(path, meta, self.staging, rank, world)
        if create:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True)
            if extras:
                np.savez(self.staging / "extras.npz", **{k.replace("/", "|"): v for k, v in extras.items()})
            write_atomic(self.staging / "meta.json", json.dumps(meta))
            self.manifest.save()
        self.reload()

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
                for name, spec in meta["arrays"].items():
                    shape = tuple(spec["shape"])
                    ds[name] = f.create_dataset(name, shape=shape, dtype=spec["dtype"], compression="lzf",
                                                chunks=(min(self.rows, n), *shape[1:]))
                ds["labels"] = f.create_dataset("labels", shape=(n,), dtype="int64")
                ds["sample_ids"] = f.create_dataset("sample_ids", shape=(n,), dtype=h5py.string_dtype())
                for k in range(self.num_chunks):
                    a, b = self.chunk_range(k)
                    with np.load(self.staging / f"chunk_{k:06d}.npz") as z:
                        for name in meta["arrays"]:
                            ds[name][a:b] = z["tok:" + name.replace("/", "|")]
                        ds["labels"][a:b] = z["labels"]
                        ds["sample_ids"][a:b] = z["sample_ids"].astype(object)
                if (self.staging / "extras.npz").is_file():
                    with np.load(self.staging / "extras.npz") as z:
                        for key in z.files:
                            f.create_dataset(key.replace("|", "/"), data=z[key])
                f.attrs["alfcache"] = json.dumps(meta)
                for key in ("format", "format_version", "dtype", "split", "num_samples", "num_layers", "width"):
                    f.attrs[key] = meta[key]
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full_error(self.path, "building the final .h5") from None
            raise
        shutil.rmtree(self.staging, ignore_errors=True)


SINKS = {"zarr": ZarrSink, "h5": H5Sink}


def _staged_metadata(path: Path) -> dict | None:
    """The metadata of a store being written: the Zarr attributes, or the HDF5 staging folder's meta.json."""
    if store_format(path) == "h5":
        f = staging_path(path) / "meta.json"
        if not f.is_file():
            return None
        try:
            return json.loads(f.read_text())
        except ValueError:
            raise StoreError(f"the staging folder of '{path}' is damaged (meta.json unreadable); rerun with "
                             f"--overwrite") from None
    return read_metadata(path) if path.exists() else None


def attach_sink(path: Path, rank: int, world: int) -> Sink:
    """A further writer (rank > 0 of a distributed run) on a store that rank 0 created or resumed."""
    return SINKS[store_format(path)](path, _staged_metadata(path), create=False, rank=rank, world=world)


def open_sink(path: Path, meta: dict, *, overwrite: bool, world: int = 1,
              extras: dict[str, np.ndarray] | None = None) -> Sink | None:
    """Create, resume or (when complete and not overwriting) skip a store. None means skip.
    With world > 1 this is rank 0's sink; the other ranks attach with `attach_sink`."""
    fmt = store_format(path)
    new = functools.partial(SINKS[fmt], rank=0, world=world)
    if overwrite:
        remove_tree(path)
        if fmt == "h5":
            shutil.rmtree(staging_path(path), ignore_errors=True)
        return new(path, meta, create=True, extras=extras)
    if path.exists():
        old = read_metadata(path)
        if old.get("complete"):
            diff = differing(old, meta, RESUME_KEYS)
            if diff:
                raise AlfError(f"store '{path}' holds a different extraction ({', '.join(diff)} differ); "
                               f"use --overwrite to replace it or --out for another location")
            return None
        if fmt == "zarr" and not Manifest(path).exists():
            raise AlfError(f"store '{path}' is incomplete and has no progress manifest; rerun with --overwrite")
    old = _staged_metadata(path)
    if old is None:
        return new(path, meta, create=True, extras=extras)
    diff = differing(old, meta, RESUME_KEYS)
    if diff:
        raise AlfError(f"store '{path}' was started with a different extraction ({', '.join(diff)} differ); "
                       f"use --overwrite to start again")
    # resume with the original metadata (created_at and all) so the result equals an uninterrupted run
    return new(path, old, create=False)
