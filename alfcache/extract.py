"""Run a backbone over a dataset split and write per-layer CLS/AP tokens into a store.

One forward pass per batch collects every tapped layer (hooks pool on the device). Batches never straddle a store
chunk (loader.py), so a chunk is complete when its last batch is done; a background thread writes it while the
next batches run (sinks.py). A rerun resumes at the first chunk not durably written and, because batch
boundaries are fixed relative to chunks, reproduces the uninterrupted arrays exactly. Distributed runs split the
chunks between ranks (ranks.py); the metadata comes from metadata.py.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import Backbone, load_backbone
from .datasets import HUB_DATASETS, ImageSource, dataset_slug, open_source
from .errors import AlfError, os_error
from .format import default_root, safe_component, store_path
from .loader import first_readable, loader_for
from .locks import store_lock
from .metadata import build_metadata, projection_arrays
from .numerics import amp_agreement, attention_backend, resolve_autocast
from .plan import free_bytes, human_bytes
from .ranks import Dist, resolve_device
from .sinks import Sink, attach_sink, chunk_rows_for, open_sink
from .taps import TapCollector, TapPlan, resolve_taps

log = logging.getLogger(__name__)
FP16_MAX = 65504.0


@dataclass
class ExtractConfig:
    model: str
    dataset: str
    protocol: str = "paper"  # registry models: the authors' extraction (paper) or each model as its authors run it
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    out: Path | None = None
    fmt: str = "zarr"
    dtype: str = "float16"
    taps: str = "alf"
    batch_size: int = 128
    workers: int = 2
    device: str = "auto"
    amp: str | None = None  # None: off for the paper protocol (the authors ran float32), auto for clean;
    # auto = bf16/fp16 on CUDA, off on CPU | off | bf16 | fp16
    overwrite: bool = False
    chunk_rows: int | None = None
    skip_corrupt: bool = False
    break_lock: bool = False
    distributed: bool = False  # torch.distributed: ranks take disjoint chunks (also on when WORLD_SIZE > 1)
    patches: bool = False  # store every patch token of the last main layer
    registers: bool = False  # store the register tokens of every main layer
    progress: bool = True


@dataclass
class SplitResult:
    split: str
    path: Path
    status: str  # written | resumed | skipped
    num_samples: int
    seconds: float = 0.0
    images_per_s: float = 0.0
    loader_wait_s: float = 0.0
    chunks_done_before: int = 0  # chunks already durable when this run started (resume)
    chunks_total: int = 0


@dataclass
class Run:
    """What every split of one extraction shares."""

    cfg: ExtractConfig
    bb: Backbone
    plan: TapPlan
    collector: TapCollector
    device: torch.device
    autocast: str | None
    dist: Dist


def check_writable(out: Path) -> None:
    """The store root can be created and written (one line naming the cause otherwise); folders made for the
    check are removed again, so a run that fails later leaves nothing behind."""
    made = [p for p in [out, *out.parents] if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".alf-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
        for p in made:  # deepest first
            p.rmdir()
    except OSError as e:
        err = os_error(out, e)
        raise (err or AlfError(f"cannot write to '{out}': {e.strerror or type(e).__name__} (choose another --out)")) from None


def probe_shapes(bb: Backbone, collector: TapCollector) -> dict[str, list[int]]:
    """Per-image shape of every array, from one forward pass on a blank image (no hand-computed widths)."""
    x = torch.zeros(1, *bb.data_config["input_size"], device=next(bb.model.parameters()).device)
    with collector.attached(), torch.inference_mode():
        bb.forward(x)
    return {k: list(v.shape[1:]) for k, v in collector.collect().items()}


def check_tokens(arrays: dict[str, torch.Tensor], dtype: str, plan: TapPlan, ids) -> None:
    for name, t in arrays.items():
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            pos = (~finite).nonzero()[0].tolist()
            where = plan.layer_names[pos[1]] if name in ("cls", "ap", "registers") else f"index {pos[1:]}"
            raise AlfError(f"non-finite {name} token at layer {where} for sample {ids[pos[0]]}; nothing written")
        if dtype == "float16" and float(t.abs().amax()) > FP16_MAX:
            raise AlfError(f"{name} tokens reach {float(t.abs().amax()):.3g}, beyond float16; rerun with --dtype float32")


def _open_sources(cfg: ExtractConfig) -> list[ImageSource]:
    if cfg.dtype not in ("float16", "float32"):
        raise AlfError(f"unknown dtype '{cfg.dtype}' (known: float16, float32)")
    if cfg.batch_size < 1:
        raise AlfError("--batch-size must be at least 1")
    if not cfg.splits or any(not s for s in cfg.splits):
        raise AlfError("no split to extract (--split needs at least one name)")
    sources = [open_source(cfg.dataset, s) for s in cfg.splits]
    for src in sources:  # the paper protocol decodes the authors' datasets as their webdataset decoder did
        src.exif = not (cfg.protocol == "paper" and cfg.dataset in HUB_DATASETS)
    return sources


def _prepare(cfg: ExtractConfig) -> Run:
    """Device, autocast, ranks, the model with its weights, the tap plan - everything before the first split."""
    device = resolve_device(cfg.device)
    amp = cfg.amp if cfg.amp is not None else ("off" if cfg.protocol == "paper" else "auto")
    autocast = resolve_autocast(amp, device)  # a bad --amp fails before any model is loaded
    dist = Dist(cfg.distributed, device)
    device = dist.device(device)
    bb = load_backbone(cfg.model, cfg.protocol)
    bb.model.to(device)
    plan = resolve_taps(bb.model, cfg.taps, bb.layout)
    if cfg.registers and not bb.num_registers:
        raise AlfError(f"--registers asked for, but model '{bb.name}' has no register tokens")
    collector = TapCollector(bb.model, plan, bb.num_prefix_tokens, patches=cfg.patches,
                             num_registers=bb.num_registers if cfg.registers else 0)
    return Run(cfg, bb, plan, collector, device, autocast, dist)


def extract(cfg: ExtractConfig) -> list[SplitResult]:
    out = Path(cfg.out) if cfg.out else default_root()
    check_writable(out)  # before any model is loaded: a folder that cannot be written is named as such
    sources = _open_sources(cfg)  # names are checked before a model is loaded
    run = _prepare(cfg)
    shapes = probe_shapes(run.bb, run.collector)
    numerics = {"device_type": run.device.type, "autocast": run.autocast,
                "attention": attention_backend(run.bb.model, run.device), "amp_check": None}
    if run.autocast:  # compare with float32 on a few real images before anything is written
        x = first_readable(sources[0], run.bb.transform(), run.bb.data_config["input_size"], run.device)
        numerics["amp_check"] = amp_agreement(run.bb.forward, run.collector, x, run.autocast)
        log.info("autocast %s agrees with float32: worst token cosine %.5f", run.autocast,
                 numerics["amp_check"]["min_cosine"])
    row_bytes = (2 if cfg.dtype == "float16" else 4) * sum(int(np.prod(v)) for v in shapes.values())
    rows = cfg.chunk_rows or chunk_rows_for(row_bytes)
    fingerprint = run.bb.fingerprint()  # hashes every weight: once per run, not once per split
    results = []
    for source in sources:
        meta = build_metadata(run.bb, source, run.plan, dataset=cfg.dataset, shapes=shapes, dtype=cfg.dtype,
                              chunk_rows=rows, batch_size=cfg.batch_size, fingerprint=fingerprint,
                              extraction=numerics)
        path = store_path(out, dataset_slug(cfg.dataset), safe_component(run.bb.name), source.split, cfg.fmt)
        _check_space(path, row_bytes * len(source) * (2 if cfg.fmt == "h5" else 1), cfg.patches)
        try:
            if run.dist.rank == 0:
                with store_lock(path, break_lock=cfg.break_lock):  # rank 0 holds it for the whole job
                    results.append(_extract_split(run, source, meta, path))
            else:
                results.append(_extract_split(run, source, meta, path))
        except OSError as e:
            err = os_error(path, e)
            if err is None:
                raise
            raise err from None
    return results


def _check_space(path: Path, need: int, patches: bool) -> None:
    """Refuse a new store the disk cannot hold (h5 needs room twice: staged chunks + the final file)."""
    free = free_bytes(path.parent)
    if patches or need > free:
        log.warning("%s: estimated store size %s (free %s)", path, human_bytes(need), human_bytes(free))
    if need > free and not path.exists():
        raise AlfError(f"store '{path}' needs about {human_bytes(need)} but only {human_bytes(free)} is free; "
                       f"free space, choose --out elsewhere, or drop --patches")


class ChunkAssembler:
    """Collects the batches of each chunk and hands a finished chunk to the writer thread (at most two chunks
    queued behind the model, so memory stays bounded)."""

    def __init__(self, sink: Sink, writer: ThreadPoolExecutor, dtype: str):
        self.sink, self.writer = sink, writer
        self.np_dtype = np.float16 if dtype == "float16" else np.float32
        self.buf: dict[int, dict] = {}
        self.writes: list[Future] = []

    def add(self, k: int, arrays: dict[str, torch.Tensor], labels: np.ndarray, ids: list[str], skipped: list[str]):
        c = self.buf.setdefault(k, {"arrays": {}, "labels": [], "ids": [], "skipped": [], "count": 0})
        for name, t in arrays.items():
            c["arrays"].setdefault(name, []).append(t.cpu().numpy().astype(self.np_dtype))
        c["labels"].append(labels)
        c["ids"] += ids
        c["skipped"] += skipped
        c["count"] += len(ids)
        a, b = self.sink.chunk_range(k)
        if c["count"] == b - a:
            done = self.buf.pop(k)
            self.writes = [f for f in self.writes if not f.done() or f.result()]
            if len(self.writes) >= 2:
                self.writes.pop(0).result()
            self.writes.append(self.writer.submit(
                self.sink.write_chunk, k, {n: np.concatenate(v) for n, v in done["arrays"].items()},
                np.concatenate(done["labels"]), done["ids"], done["skipped"]))

    def wait(self) -> None:
        for f in self.writes:
            f.result()


def _forward_batch(run: Run, x: torch.Tensor, errs: list[str], labels: np.ndarray, ids: list[str]):
    """One forward pass; unreadable images (allowed with --skip-corrupt) get zero tokens and label -1."""
    bad = [e for e in errs if e]
    if bad and not run.cfg.skip_corrupt:
        raise AlfError(bad[0] + " (pass --skip-corrupt to skip and record such images)")
    x = x.to(run.device, non_blocking=True)
    with torch.autocast(run.device.type, dtype=getattr(torch, run.autocast or "bfloat16"),
                        enabled=run.autocast is not None):
        run.bb.forward(x)
    arrays = run.collector.collect()
    skipped = [ids[j] for j, e in enumerate(errs) if e]
    if skipped:
        mask = torch.tensor([bool(e) for e in errs], device=x.device)
        for t in arrays.values():
            t[mask] = 0.0
        labels[[j for j, e in enumerate(errs) if e]] = -1
    check_tokens(arrays, run.cfg.dtype, run.plan, ids)
    return arrays, labels, skipped


def _open_split_sink(run: Run, meta: dict, path: Path) -> Sink | None:
    """Rank 0 creates, resumes or skips the store; the other ranks attach to it. None: complete, skip."""
    dist = run.dist
    sink = (open_sink(path, meta, overwrite=run.cfg.overwrite, world=dist.world, extras=projection_arrays(run.bb))
            if dist.rank == 0 else None)
    if dist.share(sink is None):
        return None
    dist.barrier()  # the store exists (created or resumed by rank 0)
    return sink if dist.rank == 0 else attach_sink(path, dist.rank, dist.world)


def _extract_split(run: Run, source: ImageSource, meta: dict, path: Path) -> SplitResult:
    cfg, dist = run.cfg, run.dist
    sink = _open_split_sink(run, meta, path)
    if sink is None:
        log.info("%s is complete; skipped (use --overwrite to redo)", path)
        return SplitResult(source.split, path, "skipped", len(source))
    all_pending = sink.pending()
    pending = [k for k in all_pending if k % dist.world == dist.rank]  # disjoint, chunk-aligned shares
    loader = loader_for(source, run.bb.transform(), meta["preprocessing"]["input_size"], pending, sink.rows,
                        cfg.batch_size, cfg.workers, run.device.type == "cuda")
    todo = sum(b - a for a, b in map(sink.chunk_range, pending))
    desc = f"extract {source.split}" + (f" [rank {dist.rank}/{dist.world}]" if dist.on else "")
    bar = tqdm(total=todo, unit="img", desc=desc, disable=not cfg.progress, smoothing=0.1)
    t0, wait = time.perf_counter(), 0.0
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="alf-writer") as writer, \
                run.collector.attached(), torch.inference_mode():
            chunks = ChunkAssembler(sink, writer, cfg.dtype)
            t_wait = time.perf_counter()
            for x, labels, idx, errs in loader:
                wait += time.perf_counter() - t_wait
                idx = idx.numpy()
                ids = [source.sample_id(int(i)) for i in idx]
                arrays, labels, skipped = _forward_batch(run, x, list(errs), labels.numpy().copy(), ids)
                chunks.add(int(idx[0]) // sink.rows, arrays, labels, ids, skipped)
                bar.update(len(idx))
                t_wait = time.perf_counter()
            chunks.wait()
    finally:
        bar.close()
    _finish(run, sink, path)
    secs = time.perf_counter() - t0
    return SplitResult(source.split, path, "resumed" if len(all_pending) < sink.num_chunks else "written", sink.n,
                       secs, todo / max(secs, 1e-9), wait, sink.num_chunks - len(all_pending), sink.num_chunks)


def _finish(run: Run, sink: Sink, path: Path) -> None:
    """Once every rank's chunks are durable, rank 0 checks none is missing and marks the store complete."""
    run.dist.barrier()
    if run.dist.rank == 0:
        sink.reload()
        if sink.pending():
            raise AlfError(f"extraction of '{path}' ended with chunks missing: {sink.pending()[:5]}")
        sink.finalize()
    run.dist.barrier()
