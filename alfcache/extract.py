"""Run a backbone over a dataset split and write per-layer CLS/AP tokens into a store.

One forward pass per batch collects every tapped layer (hooks pool on the device). Batches never
straddle a store chunk, so a chunk is complete when its last batch is done; a background thread
writes it while the next batches run. A rerun resumes at the first chunk not durably written and,
because batch boundaries are fixed relative to chunks, reproduces the uninterrupted arrays exactly.
"""
from __future__ import annotations

import logging
import platform
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .backbones import Backbone, load_backbone
from .datasets import HUB_DATASETS, ImageSource, dataset_slug, open_source
from .images import RULES as IMAGE_RULES
from .errors import AlfError
from .numerics import amp_agreement, attention_backend, resolve_autocast
from .plan import free_bytes, human_bytes
from .errors import os_error
from .format import FORMAT, PROJECTION, VERSION, array_checksum, default_root, safe_component, store_path
from .locks import store_lock
from .sinks import attach_sink, chunk_rows_for, open_sink
from .taps import TapCollector, resolve_taps

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


class _ImageDataset(torch.utils.data.Dataset):
    """Returns (image tensor, label, index, error). A bad image yields an error string, not an exception,
    so the main process can report it in one line (exceptions from workers arrive wrapped)."""

    def __init__(self, source: ImageSource, transform, input_size):
        self.source, self.transform, self.input_size = source, transform, tuple(input_size)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        try:
            x = self.transform(self.source.load(i))
            err = ""
        except AlfError as e:
            x, err = torch.zeros(self.input_size), str(e)
        return x, int(self.source.labels[i]), i, err


def _check_batch(source: ImageSource, transform, bb: Backbone, device: torch.device, k: int = 16) -> torch.Tensor:
    """The first k readable images of a split, for the autocast agreement check."""
    ds = _ImageDataset(source, transform, bb.data_config["input_size"])
    xs = [x for x, _, _, err in (ds[i] for i in range(min(len(ds), 4 * k))) if not err][:k]
    if not xs:
        raise AlfError(f"no readable image among the first {min(len(ds), 4 * k)} of split '{source.split}'")
    return torch.stack(xs).to(device)


class _ChunkBatches(torch.utils.data.Sampler):
    """Batches of indices, never crossing a chunk boundary, for the given chunks only."""

    def __init__(self, chunks: list[int], rows: int, n: int, batch_size: int):
        self.batches = [list(range(s, min(s + batch_size, min(n, (k + 1) * rows))))
                        for k in chunks for s in range(k * rows, min(n, (k + 1) * rows), batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def check_writable(out: Path) -> None:
    """The store root can be created and written (one line naming the cause otherwise); folders made for the
    check are removed again, so a run that fails later leaves nothing behind."""
    import os

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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AlfError("--device cuda was asked for but no CUDA device is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise AlfError(f"unknown device '{device}' (known: auto, cpu, cuda, cuda:N)")
    return torch.device(device)


def _library_versions() -> dict:
    import h5py
    import timm
    import zarr

    return {"alfcache": __version__, "torch": torch.__version__, "timm": timm.__version__, "zarr": zarr.__version__,
            "h5py": h5py.__version__, "numpy": np.__version__, "python": platform.python_version()}


def probe_shapes(bb: Backbone, collector: TapCollector) -> dict[str, list[int]]:
    """Per-image shape of every array, from one forward pass on a blank image (no hand-computed widths)."""
    x = torch.zeros(1, *bb.data_config["input_size"], device=next(bb.model.parameters()).device)
    with collector.attached(), torch.inference_mode():
        bb.forward(x)
    return {k: list(v.shape[1:]) for k, v in collector.collect().items()}


def build_metadata(bb: Backbone, source: ImageSource, plan, cfg: ExtractConfig, shapes: dict, chunk_rows: int,
                   autocast: str | None, weights_fingerprint: str, device_type: str) -> dict:
    n = len(source)
    L, D = shapes["cls"]
    layout = {
        "cls": "(N, L, D): token 0 of each tapped layer",
        "ap": f"(N, L, D): mean over tokens {bb.num_prefix_tokens}: (patch tokens; CLS and "
              f"{bb.num_registers} register tokens excluded)",
        "layers": "L = len(taps.layer_names), in model order; the last is the final norm for tap sets alf/blocks/modules",
        "normalised": False,
    }
    if "patches" in shapes:
        layout["patches"] = "(N, P, D): every patch token of the last tapped layer (no CLS, no registers)"
    if "registers" in shapes:
        layout["registers"] = "(N, L, R, D): the register tokens of each tapped layer"
    if plan.module_kinds:
        layout["modules"] = ("modules/<kind>/{cls,ap,mean} (N, blocks, width of the module): token 0, patch mean, "
                             "mean over all tokens, for blocks 0..n-1")
    meta = {
        "format": FORMAT,
        "format_version": VERSION,
        "model": {"name": bb.name, "source_id": bb.source_id, "library": bb.library, "fingerprint": weights_fingerprint,
                  "pretrained_weights": bb.pretrained, "architecture": bb.architecture,
                  "depth": bb.depth, "width": bb.width, "num_prefix_tokens": bb.num_prefix_tokens,
                  "num_registers": bb.num_registers, "num_patches": bb.num_patches,
                  "params": sum(p.numel() for p in bb.model.parameters())},
        "preprocessing": bb.preprocessing(),
        "taps": plan.describe(),
        "token_layout": layout,
        "arrays": {k: {"shape": [n, *v], "dtype": cfg.dtype} for k, v in sorted(shapes.items())},
        "dtype": cfg.dtype,
        "dataset": {"name": cfg.dataset, "slug": dataset_slug(cfg.dataset), **source.identity(),
                    "image_loading": {**IMAGE_RULES, "exif_orientation": "applied" if source.exif else
                                      "not applied (the authors' webdataset decoder ignores it)"}},
        "split": source.split,
        "class_names": list(source.class_names),
        "num_samples": n,
        "num_layers": L,
        "width": D,
        "chunk_rows": chunk_rows,
        "extraction": {"batch_size": cfg.batch_size, "autocast": autocast, "device_type": device_type,
                       "protocol": bb.protocol},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "library_versions": _library_versions(),
        "complete": False,
    }
    if bb.projection is not None:
        w, b = bb.projection
        meta["projection"] = {
            "module": "head", "width": int(w.shape[0]), "arrays": list(PROJECTION),
            "meaning": "the model's own output for a final-layer token t (cls[:, -1], ap[:, -1], a patch token) is "
                       "t @ weight.T + bias (CLIP: visual.proj after ln_post); the stored tokens are not projected",
            "checksums": {PROJECTION[0]: array_checksum(w), PROJECTION[1]: array_checksum(b)}}
    return meta


def projection_arrays(bb: Backbone) -> dict[str, np.ndarray] | None:
    """The store's non-per-sample arrays: the model's output projection, if it has one."""
    if bb.projection is None:
        return None
    return dict(zip(PROJECTION, bb.projection))


def _check_tokens(arrays: dict[str, torch.Tensor], dtype: str, plan, ids) -> None:
    for name, t in arrays.items():
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            pos = (~finite).nonzero()[0].tolist()
            where = plan.layer_names[pos[1]] if name in ("cls", "ap", "registers") else f"index {pos[1:]}"
            raise AlfError(f"non-finite {name} token at layer {where} for sample {ids[pos[0]]}; nothing written")
        if dtype == "float16" and float(t.abs().amax()) > FP16_MAX:
            raise AlfError(f"{name} tokens reach {float(t.abs().amax()):.3g}, beyond float16; rerun with --dtype float32")


class Dist:
    """torch.distributed helpers; a single process is rank 0 of 1 and every call is a no-op."""

    def __init__(self, enabled: bool, device: torch.device):
        import os

        import torch.distributed as td

        self.td = td
        self.on = enabled or int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.on and not td.is_initialized():
            import datetime

            td.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
        self.rank = td.get_rank() if self.on else 0
        self.world = td.get_world_size() if self.on else 1

    def barrier(self):
        if self.on:
            self.td.barrier()

    def share(self, obj):
        """Rank 0's value of `obj` on every rank."""
        if not self.on:
            return obj
        box = [obj]
        self.td.broadcast_object_list(box, src=0)
        return box[0]


def extract(cfg: ExtractConfig) -> list[SplitResult]:
    if cfg.dtype not in ("float16", "float32"):
        raise AlfError(f"unknown dtype '{cfg.dtype}' (known: float16, float32)")
    if cfg.batch_size < 1:
        raise AlfError("--batch-size must be at least 1")
    if not cfg.splits or any(not s for s in cfg.splits):
        raise AlfError("no split to extract (--split needs at least one name)")
    out = Path(cfg.out) if cfg.out else default_root()
    check_writable(out)  # before any model is loaded: a folder that cannot be written is named as such
    sources = [open_source(cfg.dataset, s) for s in cfg.splits]  # validate names before loading a model
    for src in sources:  # the paper protocol decodes the authors' datasets as their webdataset decoder did
        src.exif = not (cfg.protocol == "paper" and cfg.dataset in HUB_DATASETS)
    device = resolve_device(cfg.device)
    amp = cfg.amp if cfg.amp is not None else ("off" if cfg.protocol == "paper" else "auto")
    autocast = resolve_autocast(amp, device)  # a bad --amp fails before any model is loaded
    dist = Dist(cfg.distributed, device)
    if dist.on and device.type == "cuda":
        device = torch.device("cuda", dist.rank % torch.cuda.device_count())
    bb = load_backbone(cfg.model, cfg.protocol)
    bb.model.to(device)
    plan = resolve_taps(bb.model, cfg.taps, bb.layout)
    if cfg.registers and not bb.num_registers:
        raise AlfError(f"--registers asked for, but model '{bb.name}' has no register tokens")
    collector = TapCollector(bb.model, plan, bb.num_prefix_tokens, patches=cfg.patches,
                             num_registers=bb.num_registers if cfg.registers else 0)
    shapes = probe_shapes(bb, collector)
    transform = bb.transform()
    numerics = {"attention": attention_backend(bb.model, device), "amp_check": None}
    if autocast:  # compare with float32 on a few real images before anything is written
        numerics["amp_check"] = amp_agreement(bb.forward, collector, _check_batch(sources[0], transform, bb, device),
                                              autocast)
        log.info("autocast %s agrees with float32: worst token cosine %.5f", autocast,
                 numerics["amp_check"]["min_cosine"])
    model_slug = bb.name
    results = []
    itemsize = 2 if cfg.dtype == "float16" else 4
    row_bytes = itemsize * sum(int(np.prod(v)) for v in shapes.values())
    rows = cfg.chunk_rows or chunk_rows_for(row_bytes)
    weights_fingerprint = bb.fingerprint()  # hashes every weight: once per run, not once per split
    for source in sources:
        meta = build_metadata(bb, source, plan, cfg, shapes, rows, autocast, weights_fingerprint, device.type)
        meta["extraction"].update(**numerics)
        path = store_path(out, dataset_slug(cfg.dataset), safe_component(model_slug), source.split, cfg.fmt)
        need = row_bytes * len(source) * (2 if cfg.fmt == "h5" else 1)  # h5: staged chunks + final file
        free = free_bytes(path.parent)
        if cfg.patches or need > free:
            log.warning("%s: estimated store size %s (free %s)", path, human_bytes(need), human_bytes(free))
        if need > free and not path.exists():
            raise AlfError(f"store '{path}' needs about {human_bytes(need)} but only {human_bytes(free)} is free; "
                           f"free space, choose --out elsewhere, or drop --patches")
        try:
            if dist.rank == 0:
                with store_lock(path, break_lock=cfg.break_lock):  # rank 0 holds it for the whole job
                    results.append(_extract_split(bb, source, plan, collector, transform, meta, path, cfg, device,
                                                  autocast, dist))
            else:
                results.append(_extract_split(bb, source, plan, collector, transform, meta, path, cfg, device,
                                              autocast, dist))
        except OSError as e:
            err = os_error(path, e)
            if err is None:
                raise
            raise err from None
    return results


def _extract_split(bb, source, plan, collector, transform, meta, path, cfg, device, autocast,
                   dist: Dist) -> SplitResult:
    sink = (open_sink(path, meta, overwrite=cfg.overwrite, world=dist.world, extras=projection_arrays(bb))
            if dist.rank == 0 else None)
    skip = dist.share(sink is None)
    if skip:
        log.info("%s is complete; skipped (use --overwrite to redo)", path)
        return SplitResult(source.split, path, "skipped", len(source))
    dist.barrier()  # the store exists (created or resumed by rank 0)
    if dist.rank > 0:
        sink = attach_sink(path, dist.rank, dist.world)
    all_pending = sink.pending()
    pending = [k for k in all_pending if k % dist.world == dist.rank]  # disjoint, chunk-aligned shares
    status = "resumed" if len(all_pending) < sink.num_chunks else "written"
    rows, n = sink.rows, sink.n
    dataset = _ImageDataset(source, transform, meta["preprocessing"]["input_size"])
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_ChunkBatches(pending, rows, n, cfg.batch_size), num_workers=cfg.workers,
        pin_memory=device.type == "cuda", persistent_workers=False)
    np_dtype = np.float16 if cfg.dtype == "float16" else np.float32
    todo = sum(min(n, (k + 1) * rows) - k * rows for k in pending)
    desc = f"extract {source.split}" + (f" [rank {dist.rank}/{dist.world}]" if dist.on else "")
    bar = tqdm(total=todo, unit="img", desc=desc, disable=not cfg.progress, smoothing=0.1)
    buf: dict[int, dict] = {}
    writes: list[Future] = []
    t0 = time.perf_counter()
    wait = 0.0
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="alf-writer") as writer, collector.attached(), \
                torch.inference_mode():
            t_wait = time.perf_counter()
            for x, labels, idx, errs in loader:
                wait += time.perf_counter() - t_wait
                idx = idx.numpy()
                ids = [source.sample_id(int(i)) for i in idx]
                bad = [e for e in errs if e]
                if bad and not cfg.skip_corrupt:
                    raise AlfError(bad[0] + " (pass --skip-corrupt to skip and record such images)")
                x = x.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=getattr(torch, autocast or "bfloat16"), enabled=autocast is not None):
                    bb.forward(x)
                arrays = collector.collect()
                labels = labels.numpy().copy()
                skipped = [ids[j] for j, e in enumerate(errs) if e]
                if skipped:
                    mask = torch.tensor([bool(e) for e in errs], device=x.device)
                    for t in arrays.values():
                        t[mask] = 0.0
                    labels[[j for j, e in enumerate(errs) if e]] = -1
                _check_tokens(arrays, cfg.dtype, plan, ids)
                k = int(idx[0]) // rows
                c = buf.setdefault(k, {"arrays": {}, "labels": [], "ids": [], "skipped": [], "count": 0})
                for name, t in arrays.items():
                    c["arrays"].setdefault(name, []).append(t.cpu().numpy().astype(np_dtype))
                c["labels"].append(labels)
                c["ids"] += ids
                c["skipped"] += skipped
                c["count"] += len(idx)
                if c["count"] == min(n, (k + 1) * rows) - k * rows:
                    done = buf.pop(k)
                    writes = [f for f in writes if not f.done() or f.result()]
                    if len(writes) >= 2:  # bound memory: at most two chunks queued behind the model
                        writes.pop(0).result()
                    writes.append(writer.submit(sink.write_chunk, k,
                                                {n_: np.concatenate(v) for n_, v in done["arrays"].items()},
                                                np.concatenate(done["labels"]), done["ids"], done["skipped"]))
                bar.update(len(idx))
                t_wait = time.perf_counter()
            for f in writes:
                f.result()
    finally:
        bar.close()
    dist.barrier()  # every rank's chunks are durable
    if dist.rank == 0:
        sink.reload()
        if sink.pending():
            raise AlfError(f"extraction of '{path}' ended with chunks missing: {sink.pending()[:5]}")
        sink.finalize()
    dist.barrier()
    secs = time.perf_counter() - t0
    return SplitResult(source.split, path, status, n, secs, todo / max(secs, 1e-9), wait,
                       sink.num_chunks - len(all_pending), sink.num_chunks)
