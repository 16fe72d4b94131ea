"""Run a backbone over a dataset split and write per-layer CLS/AP tokens into a store.

One forward pass per batch collects every tapped layer (hooks pool on the device). Batches never straddle a store
chunk (loader.py), so a chunk is complete when its last batch is done; a background thread writes it while the
next batches run (sinks.py). A rerun resumes at the first chunk not durably written and, because batch
boundaries are fixed relative to chunks, reproduces the uninterrupted arrays exactly. Distributed runs split the
chunks between ranks (ranks.py); the metadata comes from metadata.py.

Several models over one dataset share one pass (`extract_many`): each image is decoded once (loader.py hands
every model its own preprocessed copy, one per distinct pipeline), each model assembles exactly the batches a
single-model run would form and writes its own stores through its own writer thread, so every store is the same
bytes as a single-model run's and resumes on its own. A single-model run is the same loop with one model.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import Backbone, load_backbone
from .datasets import HUB_DATASETS, ImageSource, dataset_slug, open_source
from .errors import AlfError, os_error
from .format import default_root, is_remote, location, safe_component, store_path
from .remote import check_writable as check_remote_writable
from .loader import ChunkBatches, first_readable, shared_loader
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
    check are removed again, so a run that fails later leaves nothing behind. On object storage: one test object
    written and deleted (no credentials, no bucket or no write permission is named before any model loads)."""
    if is_remote(out):
        check_remote_writable(out)
        return
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


@dataclass
class Job:
    """One model's part of a pass over a dataset: its run, stores' chunking and the facts every split records."""

    run: Run
    shapes: dict
    numerics: dict
    row_bytes: int
    rows: int
    fingerprint: str


def _job(cfg: ExtractConfig, sources: list[ImageSource]) -> Job:
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
    return Job(run, shapes, numerics, row_bytes, rows, fingerprint)


def extract(cfg: ExtractConfig) -> list[SplitResult]:
    """One model over the dataset's splits: one store per split."""
    return extract_many(cfg, [cfg.model])[cfg.model]


def extract_many(cfg: ExtractConfig, models: list[str], models_per_pass: int | None = None) -> dict[str, list[SplitResult]]:
    """Several models over one dataset, each image decoded once per pass for all of them: every model gets its own
    preprocessing of the decoded image, its own batches (exactly those of a single-model run, so its stores are
    the same bytes) and its own stores, each resumable on its own. Models run `models_per_pass` at a time (None:
    as many as fit, see `_fits`)."""
    if len(set(models)) != len(models):
        raise AlfError(f"a model is named twice in {', '.join(models)}")
    if models_per_pass is not None and models_per_pass < 1:
        raise AlfError("--models-per-pass must be at least 1")
    out = location(cfg.out) if cfg.out else default_root()
    check_writable(out)  # before any model is loaded: a folder that cannot be written is named as such
    sources = _open_sources(cfg)  # names are checked before a model is loaded
    results: dict[str, list[SplitResult]] = {m: [] for m in models}
    todo = list(models)
    while todo:
        jobs = [_job(replace(cfg, model=todo.pop(0)), sources)]
        while todo and (len(jobs) < models_per_pass if models_per_pass else _fits(jobs)):
            jobs.append(_job(replace(cfg, model=todo.pop(0)), sources))
        if len(models) > 1:
            log.info("one pass over %s for %s", cfg.dataset, ", ".join(j.run.bb.name for j in jobs))
        for source in sources:
            for job, res in zip(jobs, _extract_split(jobs, source, out)):
                results[job.run.cfg.model].append(res)
        del jobs
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def _fits(jobs: list[Job]) -> bool:
    """May another model join this pass? While the device (CUDA) or RAM (CPU) keeps at least a third free after
    the models loaded so far (a model's activations at batch size are small next to its weights for ViTs)."""
    device = jobs[0].run.device
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
    else:
        import psutil

        vm = psutil.virtual_memory()
        free, total = vm.available, vm.total
    return free > total / 3


def _extract_split(jobs: list[Job], source: ImageSource, out: Path) -> list[SplitResult]:
    """One split for every model of the pass: each model's store locked (rank 0), created or resumed."""
    cfg = jobs[0].run.cfg
    targets = []
    for job in jobs:
        meta = build_metadata(job.run.bb, source, job.run.plan, dataset=cfg.dataset, shapes=job.shapes,
                              dtype=cfg.dtype, chunk_rows=job.rows, batch_size=cfg.batch_size,
                              fingerprint=job.fingerprint, extraction=job.numerics)
        path = store_path(out, dataset_slug(cfg.dataset), safe_component(job.run.bb.name), source.split, cfg.fmt)
        _check_space(path, job.row_bytes * len(source) * (2 if cfg.fmt == "h5" else 1), cfg.patches)
        targets.append((job, meta, path))
    try:
        with ExitStack() as locks:
            if jobs[0].run.dist.rank == 0:  # rank 0 holds the locks for the whole job
                for _, _, path in targets:
                    locks.enter_context(store_lock(path, break_lock=cfg.break_lock))
            return _run_split(targets, source)
    except OSError as e:
        err = os_error(targets[0][2], e)
        if err is None:
            raise
        raise err from None


def _check_space(path: Path, need: int, patches: bool) -> None:
    """Refuse a new store the disk cannot hold (h5 needs room twice: staged chunks + the final file)."""
    if is_remote(path):  # object storage has no free-space figure to check against
        return
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


@dataclass
class Target:
    """A model's store of the split being extracted, and the batches it still needs."""

    job: Job
    path: Path
    sink: Sink
    batches: list[list[int]]
    index: int = 0  # position among the pass's models
    all_pending: int = 0  # chunks not yet durable when the run started (all ranks)
    chunks: ChunkAssembler | None = None
    pieces: list = field(default_factory=list)  # segments of the batch being assembled
    next_batch: int = 0


def _run_split(targets: list[tuple[Job, dict, Path]], source: ImageSource) -> list[SplitResult]:
    cfg = targets[0][0].run.cfg
    dist = targets[0][0].run.dist
    results: dict[int, SplitResult] = {}
    live: list[Target] = []
    for i, (job, meta, path) in enumerate(targets):
        sink = _open_split_sink(job.run, meta, path)
        if sink is None:
            log.info("%s is complete; skipped (use --overwrite to redo)", path)
            results[i] = SplitResult(source.split, path, "skipped", len(source))
            continue
        all_pending = sink.pending()
        if len(all_pending) < sink.num_chunks:
            log.info("%s: resuming, %d of %d chunks already written", path, sink.num_chunks - len(all_pending),
                     sink.num_chunks)
        pending = [k for k in all_pending if k % dist.world == dist.rank]  # disjoint, chunk-aligned shares
        batches = ChunkBatches(pending, sink.rows, sink.n, cfg.batch_size).batches
        live.append(Target(job, path, sink, batches, index=i, all_pending=len(all_pending)))
    if live:
        times = _stream(live, source)
        for t in live:
            _finish(t.job.run, t.sink, t.path)
            secs, wait = times
            todo = sum(len(b) for b in t.batches)
            results[t.index] = SplitResult(
                source.split, t.path, "resumed" if t.all_pending < t.sink.num_chunks else "written", t.sink.n, secs,
                todo / max(secs, 1e-9), wait, t.sink.num_chunks - t.all_pending, t.sink.num_chunks)
    return [results[i] for i in range(len(targets))]


def _stream(live: list[Target], source: ImageSource) -> tuple[float, float]:
    """Decode each needed image once, hand every model its own preprocessed copy, run each model on exactly its own
    batches, and queue finished chunks to each model's writer thread. Returns (seconds, seconds waiting for
    images)."""
    run0 = live[0].job.run
    cfg, dist = run0.cfg, run0.dist
    loader = shared_loader(source, [t.job.run.bb.transform() for t in live],
                           [t.job.run.bb.data_config["input_size"] for t in live], [t.batches for t in live],
                           cfg.workers, run0.device.type == "cuda")
    rows = len({r for t in live for b in t.batches for r in b}) if len(live) > 1 else sum(map(len, live[0].batches))
    desc = f"extract {source.split}" + (f" [rank {dist.rank}/{dist.world}]" if dist.on else "") + \
        (f" x {len(live)} models" if len(live) > 1 else "")
    bar = tqdm(total=rows, unit="img", desc=desc, disable=not cfg.progress, smoothing=0.1)
    t0, wait = time.perf_counter(), 0.0
    try:
        with ExitStack() as stack:
            for t in live:
                writer = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="alf-writer"))
                t.chunks = ChunkAssembler(t.sink, writer, cfg.dtype)
                stack.enter_context(t.job.run.collector.attached())
            stack.enter_context(torch.inference_mode())
            t_wait = time.perf_counter()
            for xs, labels, idx, errs in loader:
                wait += time.perf_counter() - t_wait
                for t, x in zip(live, xs):
                    if x is not None:
                        _take(t, x, labels, idx, errs, source)
                bar.update(len(idx))
                t_wait = time.perf_counter()
            for t in live:
                t.chunks.wait()
    finally:
        bar.close()
    return time.perf_counter() - t0, wait


def _take(t: Target, x, labels, idx, errs, source: ImageSource) -> None:
    """Add a segment to the model's current batch; when the batch is whole (the same rows a single-model run would
    batch), run the model on it."""
    t.pieces.append((x, labels, idx, errs))
    want = len(t.batches[t.next_batch])
    if sum(len(p[2]) for p in t.pieces) < want:
        return
    x = torch.cat([p[0] for p in t.pieces]) if len(t.pieces) > 1 else t.pieces[0][0]
    labels = torch.cat([p[1] for p in t.pieces]).numpy().copy()
    idx = torch.cat([p[2] for p in t.pieces]).numpy()
    errs = [e for p in t.pieces for e in p[3]]
    t.pieces, t.next_batch = [], t.next_batch + 1
    ids = [source.sample_id(int(i)) for i in idx]
    arrays, labels, skipped = _forward_batch(t.job.run, x, errs, labels, ids)
    t.chunks.add(int(idx[0]) // t.sink.rows, arrays, labels, ids, skipped)


def _finish(run: Run, sink: Sink, path: Path) -> None:
    """Once every rank's chunks are durable, rank 0 checks none is missing and marks the store complete."""
    run.dist.barrier()
    if run.dist.rank == 0:
        sink.reload()
        if sink.pending():
            raise AlfError(f"extraction of '{path}' ended with chunks missing: {sink.pending()[:5]}")
        sink.finalize()
    run.dist.barrier()
