"""`alf`: thin command-line glue over alfcache (extraction), probes (heads on stored tokens) and alfstudy
(whole studies, here or on Slurm). Every command checks its arguments first - cheaply, before any heavy import or I/O - then makes
one call. Errors are one line on stderr and exit 2; third-party log chatter goes to a log file (or, with -v, to
the terminal)."""
from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from alfcache.errors import AlfError
from alfcache.format import StoreError
from probes.errors import ProbeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Extract ViT layer tokens once into stores; probe them many times.")
ERRORS = (AlfError, ProbeError, StoreError)
MAX_TEXT = 1000  # longest name or path accepted on the command line


# ------------------------------------------------------------------------------------------ argument checks
def _bad(msg: str) -> AlfError:
    return AlfError(msg)


def _at_least(option: str, value: int, minimum: int, maximum: int | None = None) -> int:
    if value < minimum or (maximum is not None and value > maximum):
        rng = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise _bad(f"{option} must be {rng} (got {value})")
    return value


def _text(option: str, value: str) -> str:
    if not value or not value.strip():
        raise _bad(f"{option} must not be empty")
    if len(value) > MAX_TEXT:
        raise _bad(f"{option} is {len(value)} characters long (at most {MAX_TEXT})")
    return value.strip()


def _names(option: str, value: str) -> list[str]:
    """A comma-separated list of non-empty names."""
    _text(option, value)
    parts = [p.strip() for p in value.split(",")]
    if any(not p for p in parts):
        raise _bad(f"{option} has an empty name in '{value}' (comma-separated names, no empty entries)")
    return parts


def _choice(option: str, value: str, choices) -> str:
    if value not in choices:
        raise _bad(f"unknown {option} '{value[:80]}' (known: {', '.join(choices)})")
    return value


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value or ""):
        raise _bad(f"unknown --device '{value[:80]}' (known: auto, cpu, cuda, cuda:N)")
    return value


def _path(option: str, value: Path | None) -> Path | None:
    if value is not None:
        _text(option, str(value))
    return value


def _model(value: str) -> str:
    from alfcache.sources import parse_model

    parse_model(_text("--model", value))
    return value


def _dataset(value: str) -> str:
    from alfcache.datasets import check_dataset_name

    check_dataset_name(_text("--dataset", value))
    return value


def _heads(value: str) -> list[str]:
    from probes.heads import check_heads

    heads = _names("--head", value)
    check_heads(heads)
    return heads


def _protocol(value: str, choices=None) -> str:
    from probes.protocol import PROTOCOLS

    return _choice("--protocol", value, choices or list(PROTOCOLS))


def _split_names(value: str) -> list[str]:
    splits = _names("--split", value)
    for s in splits:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", s):
            raise _bad(f"--split '{s[:80]}' is not a split name (letters, digits, '-', '_', '.')")
    return splits


def _command() -> str:
    """The command line that produced a report (for its provenance)."""
    import shlex

    return "alf " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) if rows else len(c) for c in cols}
    out = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    out += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ logging
def _log_file() -> Path | None:
    path = os.environ.get("ALF_LOG")
    if path:
        return Path(path)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "alfcache" / "alf.log"


def setup_logging(verbose: bool) -> None:
    """Our own warnings on stderr; everything from other libraries (retry chatter, deprecation warnings) into a
    log file - or, with -v, on stderr too."""
    for var in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_HUB_VERBOSITY"):
        os.environ.setdefault(var, "info" if verbose else "error")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    if verbose:
        console.setLevel(logging.INFO)
    else:
        console.setLevel(logging.WARNING)
        console.addFilter(lambda r: r.name.split(".")[0] in ("alfcache", "probes", "alfstudy", "cli"))
    root.addHandler(console)
    path = _log_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        root.addHandler(handler)
    except OSError:
        pass  # no writable log location: third-party chatter is simply dropped
    logging.captureWarnings(True)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="show other libraries' logs too")):
    setup_logging(verbose)


# ------------------------------------------------------------------------------------------ listing
@app.command()
def models():
    """List the model short names: hub weights, family, blocks, width, tokens per image, params, projection."""
    from alfcache.registry import MODELS, describe

    rows = [describe(name) for name in MODELS]
    typer.echo(_table(rows, ["name", "source_id", "family", "blocks", "width", "tokens", "params_m", "projection"]))
    typer.echo("\nAlso: timm:<timm id>, hf:<transformers id or folder>, local-dir:<timm save_for_hf folder> or "
               "that folder's path. Weights live in the Hugging Face hub repo timm/<source_id>.")


@app.command()
def datasets():
    """List the dataset short names (train sizes from the authors' dataset_info.json)."""
    from alfcache.datasets import DATASETS

    rows = [{"name": e.name, "description": e.description} for e in DATASETS.values()]
    rows.append({"name": "imagefolder:<path>", "description": "<path>/{train,test}/<class>/* or <path>/<class>/* (80/20 split)"})
    rows.append({"name": "hf:<id or folder>", "description": "any HF image-classification dataset (image/label columns detected)"})
    typer.echo(_table(rows, ["name", "description"]))


@app.command()
def ls(store_root: Optional[str] = typer.Argument(None, help="store root: a folder or s3://bucket/prefix (default "
                                                           "$ALF_FEATURES or ./features)")):
    """List stores: dataset, model, split, N, layers, width, size on disk, complete (or DAMAGED)."""
    from alfcache.format import (check_intact, default_root, find_stores, location, open_arrays, read_metadata,
                                 size_of)

    root = location(_path("store root", store_root)) if store_root is not None else default_root()
    rows = []
    for p in find_stores(root):
        try:
            m = read_metadata(p)
            with open_arrays(p, m) as arrays:  # every array present, every chunk of a complete store on disk
                check_intact(p, m, arrays.handle, chunks=bool(m.get("complete")))
        except StoreError as e:
            rows.append({"path": str(p), "complete": "DAMAGED", "dataset": str(e)[:100]})
            continue
        size = size_of(p)
        rows.append({"dataset": m["dataset"]["name"], "model": m["model"]["name"], "split": m["split"],
                     "N": m["num_samples"], "layers": m["num_layers"], "width": m["width"], "dtype": m["dtype"],
                     "protocol": m.get("extraction", {}).get("protocol", "-"), "size_mb": f"{size / 2**20:.1f}",
                     "complete": "yes" if m.get("complete") else "NO", "path": str(p)})
    if not rows:
        typer.echo(f"no stores under {root}")
        return
    typer.echo(_table(rows, ["dataset", "model", "split", "N", "layers", "width", "dtype", "protocol", "size_mb",
                             "complete", "path"]))


# ------------------------------------------------------------------------------------------ fetching
@app.command()
def fetch(
    model: Optional[str] = typer.Option(None, help="comma-separated models (short names, timm:<id>, hf:<id>)"),
    dataset: Optional[str] = typer.Option(None, help="comma-separated datasets (short names, hf:<id>)"),
    split: str = typer.Option("train,test", help="dataset splits to fetch"),
    check: bool = typer.Option(False, "--check", help="only list what is cached and what is missing (and its size)"),
):
    """Download weights and datasets into the Hugging Face cache (HF_HOME / HF_HUB_CACHE), e.g. on a login node;
    without names: the whole paper study. Then run anywhere with HF_HUB_OFFLINE=1."""
    models_ = [_model(m) for m in _names("--model", model)] if model is not None else None
    datasets_ = _names("--dataset", dataset) if dataset is not None else None
    splits = tuple(_split_names(split))
    from alfcache.fetch import check as check_items, fetch as fetch_items, items_for
    from alfcache.plan import human_bytes

    items = items_for(models_, datasets_, splits)
    if check:
        rows = [{"kind": it.kind, "name": it.name, "repo": it.repo, "cached": human_bytes(it.cached_bytes),
                 "missing": ("unknown (hub unreachable)" if it.missing_bytes is None and not it.complete else
                             human_bytes(it.missing_bytes or 0)), "status": "ok" if it.complete else "MISSING"}
                for it in check_items(items)]
        typer.echo(_table(rows, ["kind", "name", "repo", "cached", "missing", "status"]))
        need = [it for it in items if not it.complete]
        known = sum(it.missing_bytes or 0 for it in need)
        typer.echo(f"\n{len(items) - len(need)} of {len(items)} complete; missing: {len(need)}"
                   + (f", {human_bytes(known)} to download" if need and all(i.missing_bytes is not None for i in need) else ""))
        if need:
            raise typer.Exit(1)
        return
    for path in fetch_items(items):
        typer.echo(f"cached: {path}")


# ------------------------------------------------------------------------------------------ extraction
@app.command()
def extract(
    model: str = typer.Option(..., help="short name (alf models), timm:<id>, hf:<transformers id or folder>, "
                                        "local-dir:<path> or a model folder; several, comma-separated: each image "
                                        "is decoded once for all of them, each model writes its own stores"),
    dataset: str = typer.Option(..., help="short name (alf datasets), imagefolder:<path> or hf:<id or folder>"),
    models_per_pass: Optional[int] = typer.Option(None, help="with several models: how many share one pass over "
                                                  "the images (default: as many as leave a third of the device or "
                                                  "RAM free)"),
    protocol: str = typer.Option("paper", help="registry models: paper (the authors' extraction, fact by fact) | "
                                 "clean (CLIP with QuickGELU, bicubic resizing for DINOv2/MAE)"),
    split: str = typer.Option("train,test", help="comma-separated splits"),
    batch_size: int = typer.Option(128, help="images per forward pass"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    workers: int = typer.Option(2, help="DataLoader worker processes (0: load in the main process)"),
    format: str = typer.Option("zarr", "--format", help="zarr | h5"),
    dtype: str = typer.Option("float16", help="float16 | float32 (stored precision)"),
    taps: str = typer.Option("alf", help="alf | blocks | modules | comma-separated module names"),
    out: Optional[str] = typer.Option(None, help="store root: a folder or s3://bucket/prefix (default $ALF_FEATURES "
                                                 "or ./features)"),
    overwrite: bool = typer.Option(False, help="redo complete stores"),
    amp: Optional[str] = typer.Option(None, help="off (default with --protocol paper: float32, as the authors) | "
                                      "auto (default with clean: bf16, else fp16, on CUDA; off on CPU) | bf16 | fp16; "
                                      "checked against float32 on 16 images before writing"),
    chunk_rows: Optional[int] = typer.Option(None, help="rows per store chunk (default: ~8 MB chunks)"),
    skip_corrupt: bool = typer.Option(False, help="skip unreadable images, recording them in metadata"),
    break_lock: bool = typer.Option(False, help="take over a lock held by a process that is gone"),
    patches: bool = typer.Option(False, help="also store every patch token of the last layer (large; for the "
                                             "attentive and alf-patches heads)"),
    registers: bool = typer.Option(False, help="also store the register tokens of every layer"),
    distributed: bool = typer.Option(False, help="one rank of a torchrun job: ranks write disjoint chunks of one "
                                                 "store (automatic when WORLD_SIZE > 1)"),
):
    """Run a backbone over a dataset and write per-layer CLS/AP tokens, one store per split."""
    models = [_model(m) for m in _names("--model", model)]
    _dataset(dataset), _device(device), _path("--out", out)
    if models_per_pass is not None:
        _at_least("--models-per-pass", models_per_pass, 1, 1024)
    if len(set(models)) != len(models):
        raise _bad(f"--model names a model twice: {model}")
    _choice("--protocol", protocol, ("paper", "clean")), _choice("--format", format, ("zarr", "h5"))
    _choice("--dtype", dtype, ("float16", "float32")), _text("--taps", taps)
    if amp is not None:
        _choice("--amp", amp, ("auto", "off", "bf16", "fp16"))
    splits = _split_names(split)
    _at_least("--batch-size", batch_size, 1, 1 << 16), _at_least("--workers", workers, 0, 256)
    if chunk_rows is not None:
        _at_least("--chunk-rows", chunk_rows, 1, 1 << 20)
    from alfcache.extract import ExtractConfig, extract_many

    cfg = ExtractConfig(model=models[0], dataset=dataset, protocol=protocol, splits=splits, out=out, fmt=format,
                        dtype=dtype, taps=taps, batch_size=batch_size, workers=workers, device=device, amp=amp,
                        overwrite=overwrite, chunk_rows=chunk_rows, skip_corrupt=skip_corrupt, break_lock=break_lock,
                        patches=patches, registers=registers, distributed=distributed)
    for m, results in extract_many(cfg, models, models_per_pass).items():
        for r in results:
            rate = f", {r.images_per_s:.0f} img/s, loader wait {r.loader_wait_s:.1f}s" if r.status != "skipped" else ""
            if r.status == "resumed":
                rate += f", {r.chunks_done_before} of {r.chunks_total} chunks were already durable"
            typer.echo((f"{m} " if len(models) > 1 else "") + f"{r.split}: {r.status} {r.path} (N={r.num_samples}{rate})")


@app.command("build-random-model")
def build_random_model(
    path: Path = typer.Argument(..., help="folder to write (timm save_for_hf layout)"),
    arch: str = typer.Option("vit_tiny_patch16_224", help="timm architecture"),
    img_size: int = 32, patch_size: int = 4, embed_dim: int = 64, depth: int = 6, num_heads: int = 4,
    seed: int = 0,
):
    """Write a small timm ViT with RANDOM weights to a folder (offline pipeline exercise)."""
    _path("path", path), _text("--arch", arch)
    for option, value in (("--img-size", img_size), ("--patch-size", patch_size), ("--embed-dim", embed_dim),
                          ("--depth", depth), ("--num-heads", num_heads)):
        _at_least(option, value, 1, 4096)
    _at_least("--seed", seed, 0)
    if embed_dim % num_heads or img_size % patch_size:
        raise _bad("--embed-dim must be a multiple of --num-heads and --img-size of --patch-size")
    from alfcache.backbones import build_random_model as build

    p = build(path, arch, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
              num_heads=num_heads, seed=seed)
    typer.echo(f"wrote {p} (RANDOM weights: features only exercise the pipeline, they carry no pretraining)")


# ------------------------------------------------------------------------------------------ probing
@app.command()
def probe(
    head: str = typer.Option("alf", help="head name, comma-separated names, or 'all' (every head the store supports)"),
    dataset: Optional[str] = typer.Option(None, help="dataset name as recorded in the stores (optional if one)"),
    model: Optional[str] = typer.Option(None, help="model name as recorded in the stores (optional if one)"),
    store_root: Optional[str] = typer.Option(None, help="where the stores are: a folder or s3://bucket/prefix "
                                                        "(default $ALF_FEATURES or ./features)"),
    cache_dir: Optional[Path] = typer.Option(None, help="copy stores on object storage here once and read them "
                                             "locally (reused while a store is unchanged)"),
    protocol: str = typer.Option("paper", "--protocol", "--grid",
                                 help="paper (the authors' runs) | clean (paper, clean validation) | quick (CPU)"),
    out: Path = typer.Option(Path("results"), help="results folder"),
    seed: int = typer.Option(0, help="first seed"),
    seeds: int = typer.Option(1, help="number of seeds (seed, seed+1, ...): tables show mean ± std over them"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    allow_incomplete: bool = typer.Option(False, help="probe stores whose extraction did not finish"),
    tap: Optional[str] = typer.Option(None, help="probe a module tap of a `--taps modules` store, e.g. ffn_activation"),
    verify: bool = typer.Option(True, help="check every chunk's checksum before training"),
    distributed: bool = typer.Option(False, help="one rank of a torchrun job: ranks share each grid's "
                                     "configurations (implied when WORLD_SIZE > 1)"),
):
    """Train heads on stored tokens; write one JSON per (dataset, model, head) and a summary table."""
    heads = _heads(head)
    _protocol(protocol), _at_least("--seed", seed, 0, 2**31 - 1), _device(device), _path("--out", out)
    _at_least("--seeds", seeds, 1, 100), _path("--store-root", store_root), _path("--cache-dir", cache_dir)
    for option, value in (("--dataset", dataset), ("--model", model), ("--tap", tap)):
        if value is not None:
            _text(option, value)
    from alfcache.format import default_root
    from alfstudy.probe import probe_stores

    md = probe_stores(store_root or default_root(), heads, out, dataset=dataset, model=model, protocol=protocol,
                      seed=seed, device=device, allow_incomplete=allow_incomplete, tap=tap, verify=verify,
                      distributed=distributed, seeds=seeds, echo=typer.echo, cache_dir=cache_dir)
    if md is not None:
        typer.echo("\n" + md.read_text())
        typer.echo(f"results in {out}/ (summary.md, summary.csv, one JSON per head)")


@app.command()
def verify(stores: list[str] = typer.Argument(..., help="store paths (.zarr folders, .h5 files, s3://.../x.zarr)")):
    """Re-read every chunk of each store and check it against the checksums recorded at extraction."""
    for p in stores:
        _path("store", p)
    from alfcache.format import verify_store

    for p in stores:
        typer.echo(f"{p}: ok ({verify_store(p, progress=True)} chunks)")


@app.command()
def report(
    store_root: Optional[str] = typer.Option(None, help="stores: a folder or s3://bucket/prefix (default "
                                                        "$ALF_FEATURES or ./features)"),
    results: Path = typer.Option(Path("results"), help="results folder written by `alf probe`"),
    out: Path = typer.Option(Path("reports"), help="report folder"),
    dataset: Optional[str] = typer.Option(None), model: Optional[str] = typer.Option(None),
    protocol: str = typer.Option("quick", "--protocol", "--grid", help="protocol of the per-layer linear probes"),
    cka: str = typer.Option("linear", help="linear | rbf (debiased CKA kernel)"),
    layers: bool = typer.Option(True, help="run the per-layer probes + CKA (needs the stores)"),
    modules: bool = typer.Option(True, help="for `--taps modules` stores: linear probe on every block x module"),
    seed: int = typer.Option(0, help="first seed"),
    seeds: int = typer.Option(1, help="seeds of the per-layer probes (plots show the spread as a band)"),
    device: str = "auto",
):
    """Per-layer accuracy + CKA plots, ALF heatmaps and tables against the paper, linked from index.md."""
    _protocol(protocol), _choice("--cka", cka, ("linear", "rbf")), _at_least("--seed", seed, 0), _device(device)
    _at_least("--seeds", seeds, 1, 100)
    for option, value in (("--store-root", store_root), ("--results", results), ("--out", out)):
        _path(option, value)
    from alfcache.format import default_root
    from alfstudy.report import build_report
    from alfstudy.results import check_output

    check_output(out)
    index = build_report(store_root or default_root(), results, out, dataset=dataset, model=model,
                         protocol=protocol, cka=cka, layers=layers, modules=modules, seed=seed, seeds=seeds,
                         device=device, command=_command())
    typer.echo(f"report: {index}")
    means = out / "tables" / "means_vs_paper.md"
    if means.exists():
        typer.echo(means.read_text())


def _key_values(option: str, items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key.strip().lstrip("-")):
            raise _bad(f"{option} takes KEY=VALUE (an sbatch option without its dashes), got '{item}'")
        out[key.strip().lstrip("-")] = value
    return out


@app.command()
def reproduce(
    models: str = typer.Option(",".join(["vit-s", "vit-b", "vit-l", "dinov2-s", "dinov2-b", "dinov2-l", "clip-b32",
                                          "clip-b16", "clip-l"]), help="comma-separated models"),
    datasets: Optional[str] = typer.Option(None, help="comma-separated datasets (default: the paper's 19)"),
    heads: str = typer.Option("all", help="comma-separated heads or all"),
    protocol: str = typer.Option("paper", "--protocol", "--grid", help="probe protocol (paper or clean also pick "
                                 "the registry's extraction protocol; quick extracts as paper)"),
    root: Path = typer.Option(Path("."), help="folder for features/, results/, reports/ and study/ (markers, logs)"),
    device: str = typer.Option("auto"), workers: int = typer.Option(2), batch_size: int = typer.Option(128),
    dtype: str = typer.Option("float32", help="stored precision: float32 (as the authors) or float16 (half the disk)"),
    seed: int = typer.Option(0, help="first seed"),
    seeds: int = typer.Option(1, help="seeds per head (the paper: 1); tables show mean ± std over them"),
    executor: str = typer.Option("local", help="local (this process) | slurm (job arrays through submitit)"),
    plan: bool = typer.Option(False, "--plan", help="print the tasks it would run or submit, with estimates; run "
                              "nothing"),
    wait: bool = typer.Option(False, help="slurm: wait for the jobs, print the status, exit 1 if a pair failed"),
    models_per_task: str = typer.Option("auto", help="models of one dataset in one extraction task, sharing one "
                                        "decode of every image: N, or auto (the models that decoding limits)"),
    partition: Optional[str] = typer.Option(None, help="slurm: partition of the extraction tasks"),
    gpus: int = typer.Option(1, help="slurm: GPUs per extraction task"),
    cpus: int = typer.Option(8, help="slurm: CPUs per task"),
    mem_gb: Optional[int] = typer.Option(None, help="slurm: memory per task (GB)"),
    time_limit: int = typer.Option(720, "--time", help="slurm: time limit of an extraction task (minutes); a task "
                                   "that reaches it is requeued and resumes"),
    probe_partition: Optional[str] = typer.Option(None, help="slurm: partition of probe and report tasks "
                                                  "(default: --partition)"),
    probe_gpus: int = typer.Option(0, help="slurm: GPUs per probe task"),
    probe_time: int = typer.Option(240, help="slurm: time limit of a probe task (minutes)"),
    parallel: int = typer.Option(64, help="slurm: tasks of one array running at once"),
    account: Optional[str] = typer.Option(None, help="slurm: account"),
    qos: Optional[str] = typer.Option(None, help="slurm: QoS"),
    slurm_opt: list[str] = typer.Option([], "--slurm", help="slurm: any sbatch option as KEY=VALUE (repeat it)"),
    setup: list[str] = typer.Option([], help="slurm: a shell line run before each task, e.g. 'module load cuda' "
                                    "(repeat it)"),
    nodes_online: bool = typer.Option(False, help="slurm: the compute nodes have internet (else only what is in "
                                      "the cache is submitted, and tasks run with HF_HUB_OFFLINE=1)"),
    include_unreachable: bool = typer.Option(False, help="run or submit pairs the reachability check skips"),
):
    """The whole study: extract (complete stores skipped), probe every head, report. Rerun to resume: only what
    is missing runs (or is submitted). `alf status --root ROOT` shows where it stands."""
    model_list = [_model(m) for m in _names("--models", models)]
    from alfcache.datasets import PAPER_DATASETS

    dataset_list = [_dataset(d) for d in _names("--datasets", datasets)] if datasets is not None else PAPER_DATASETS
    head_list = _heads(heads)
    _protocol(protocol), _device(device), _path("--root", root), _choice("--dtype", dtype, ("float16", "float32"))
    _at_least("--workers", workers, 0, 256), _at_least("--batch-size", batch_size, 1, 1 << 16)
    _at_least("--seed", seed, 0, 2**31 - 1), _at_least("--seeds", seeds, 1, 100)
    _choice("--executor", executor, ("local", "slurm"))
    if models_per_task != "auto" and not models_per_task.isdigit():
        raise _bad(f"--models-per-task takes a number or auto (got '{models_per_task}')")
    per_task = None if models_per_task == "auto" else _at_least("--models-per-task", int(models_per_task), 1, 64)
    for option, value, lo in (("--gpus", gpus, 0), ("--cpus", cpus, 1), ("--time", time_limit, 1),
                              ("--probe-gpus", probe_gpus, 0), ("--probe-time", probe_time, 1),
                              ("--parallel", parallel, 1)):
        _at_least(option, value, lo)
    extra = _key_values("--slurm", slurm_opt)
    slurm = None
    if executor == "slurm":
        from alfstudy.executors import Resources, SlurmOptions

        common = dict(cpus=cpus, mem_gb=mem_gb, account=account, qos=qos, extra=extra)
        slurm = SlurmOptions(Resources(partition=partition, gpus=gpus, time_min=time_limit, **common),
                             Resources(partition=probe_partition or partition, gpus=probe_gpus, time_min=probe_time,
                                       **common), parallel=parallel, setup=list(setup))
    elif wait or extra or setup:
        raise _bad("--wait, --slurm and --setup go with --executor slurm")
    from alfstudy.reproduce import reproduce as run

    run(model_list, dataset_list, head_list, root=root, protocol=protocol, device=device, workers=workers,
        batch_size=batch_size, dtype=dtype, seed=seed, seeds=seeds, command=_command(), executor=executor,
        slurm=slurm, plan_only=plan, wait=wait, models_per_task=per_task, nodes_online=nodes_online,
        include_unreachable=include_unreachable, echo=typer.echo,
        echo_err=lambda text: typer.secho(text, err=True, fg=typer.colors.RED))


@app.command()
def status(root: Path = typer.Option(Path("."), help="the --root of `alf reproduce`")):
    """The study under ROOT: planned / queued / running / done / failed per pair and stage, with job ids, log files
    and errors - read from the study's own files, not from the scheduler's accounting."""
    _path("--root", root)
    from alfstudy.status import table

    typer.echo(table(root))


# ------------------------------------------------------------------------------------------ entry point
def _click_exceptions():
    try:
        from typer._click import exceptions  # typer >= 0.29 vendors click
    except ImportError:  # pragma: no cover - older typer uses click itself
        from click import exceptions
    return exceptions


def main() -> None:
    exc = _click_exceptions()
    try:
        rc = app(standalone_mode=False)  # click returns (does not raise) a typer.Exit's code in this mode
    except ERRORS as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except exc.NoArgsIsHelpError as e:  # `alf` alone: the help
        typer.echo(e.format_message())
        sys.exit(0)
    except exc.UsageError as e:  # unknown command or option, missing or malformed value: one line too
        ctx = e.ctx
        cmd = f"alf {ctx.info_name} --help" if ctx is not None and ctx.parent is not None else "alf --help"
        typer.secho(f"error: {e.format_message()} (see `{cmd}`)", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except exc.ClickException as e:
        typer.secho(f"error: {e.format_message()}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.secho("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
    except Exception as e:
        from alfcache.format import explain

        msg = explain(e, remote=False)  # object storage: credentials, bucket, access, network
        if msg is not None:
            typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)
            sys.exit(2)
        if not isinstance(e, OSError):
            raise
        # a disk that fills or a folder that vanishes outside the paths we check
        where = f" '{e.filename}'" if e.filename else ""
        typer.secho(f"error: {e.strerror or type(e).__name__}{where}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
