"""`alf`: thin command-line glue over alfcache (extraction) and probes (heads on stored tokens)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from alfcache.errors import AlfError
from alfcache.format import StoreError
from probes.errors import ProbeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Extract ViT layer tokens once into stores; probe them many times.")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


def _table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) if rows else len(c) for c in cols}
    line = "  ".join(c.ljust(widths[c]) for c in cols)
    out = [line, "  ".join("-" * widths[c] for c in cols)]
    out += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(out)


@app.command()
def models():
    """List the model short names: source id, blocks, width, tokens per image, params."""
    from alfcache.registry import MODELS, describe

    rows = [describe(name) for name in MODELS]
    typer.echo(_table(rows, ["name", "source_id", "family", "blocks", "width", "tokens", "params_m", "projection"]))
    typer.echo("\nAlso: timm:<any timm id>, local-dir:<folder written by timm.models.save_for_hf>, or that folder's path.")


@app.command()
def datasets():
    """List the dataset short names."""
    from alfcache.datasets import DATASETS

    rows = [{"name": e.name, "description": e.description} for e in DATASETS.values()]
    rows.append({"name": "imagefolder:<path>", "description": "<path>/{train,test}/<class>/* or <path>/<class>/* (80/20 split)"})
    rows.append({"name": "hf:<id or folder>", "description": "any HF image-classification dataset (image/label columns detected)"})
    typer.echo(_table(rows, ["name", "description"]))


@app.command()
def extract(
    model: str = typer.Option(..., help="short name (alf models), timm:<id>, hf:<transformers id or folder>, "
                                        "local-dir:<path> or a model folder"),
    dataset: str = typer.Option(..., help="short name (alf datasets) or imagefolder:<path>"),
    protocol: str = typer.Option("paper", help="registry models: paper (the authors' extraction, fact by fact) | "
                                 "clean (CLIP with QuickGELU, bicubic resizing for DINOv2/MAE)"),
    split: str = typer.Option("train,test", help="comma-separated splits"),
    batch_size: int = typer.Option(128, help="images per forward pass"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    workers: int = typer.Option(2, help="DataLoader worker processes"),
    format: str = typer.Option("zarr", "--format", help="zarr | h5"),
    dtype: str = typer.Option("float16", help="float16 | float32 (stored precision)"),
    taps: str = typer.Option("alf", help="alf | blocks | modules | comma-separated module names"),
    out: Optional[Path] = typer.Option(None, help="store root (default $ALF_FEATURES or ./features)"),
    overwrite: bool = typer.Option(False, help="redo complete stores"),
    amp: Optional[str] = typer.Option(None, help="off (default with --protocol paper: float32, as the authors) | "
                                      "auto (default with clean: bf16, else fp16, on CUDA; off on CPU) | bf16 | fp16; "
                            "checked against float32 on 16 images before writing"),
    chunk_rows: Optional[int] = typer.Option(None, help="rows per store chunk (default: ~4 MB chunks)"),
    skip_corrupt: bool = typer.Option(False, help="skip unreadable images, recording them in metadata"),
    break_lock: bool = typer.Option(False, help="take over a lock held by a process that is gone"),
    patches: bool = typer.Option(False, help="also store every patch token of the last layer (large; for the "
                                             "attentive and alf-patches heads)"),
    registers: bool = typer.Option(False, help="also store the register tokens of every layer"),
    distributed: bool = typer.Option(False, help="one rank of a torchrun job: ranks write disjoint chunks of one "
                                                 "store (automatic when WORLD_SIZE > 1)"),
):
    """Run a backbone over a dataset and write per-layer CLS/AP tokens, one store per split."""
    from alfcache.extract import ExtractConfig, extract as run

    cfg = ExtractConfig(model=model, dataset=dataset, protocol=protocol, splits=[s for s in split.split(",") if s], out=out,
                        fmt=format, dtype=dtype, taps=taps, batch_size=batch_size, workers=workers, device=device,
                        amp=amp, overwrite=overwrite, chunk_rows=chunk_rows, skip_corrupt=skip_corrupt,
                        break_lock=break_lock, patches=patches, registers=registers, distributed=distributed)
    for r in run(cfg):
        rate = f", {r.images_per_s:.0f} img/s, loader wait {r.loader_wait_s:.1f}s" if r.status != "skipped" else ""
        if r.status == "resumed":
            rate += f", {r.chunks_done_before} of {r.chunks_total} chunks were already durable"
        typer.echo(f"{r.split}: {r.status} {r.path} (N={r.num_samples}{rate})")


@app.command("build-random-model")
def build_random_model(
    path: Path = typer.Argument(..., help="folder to write (timm save_for_hf layout)"),
    arch: str = typer.Option("vit_tiny_patch16_224", help="timm architecture"),
    img_size: int = 32, patch_size: int = 4, embed_dim: int = 64, depth: int = 6, num_heads: int = 4,
    seed: int = 0,
):
    """Write a small timm ViT with RANDOM weights to a folder (offline pipeline exercise)."""
    from alfcache.backbones import build_random_model as build

    p = build(path, arch, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
              num_heads=num_heads, seed=seed)
    typer.echo(f"wrote {p} (RANDOM weights: features only exercise the pipeline, they carry no pretraining)")


@app.command()
def ls(store_root: Optional[Path] = typer.Argument(None, help="store root (default $ALF_FEATURES or ./features)")):
    """List stores: dataset, model, split, N, layers, width, size on disk, complete."""
    from alfcache.format import StoreError, default_root, find_stores, read_metadata

    root = store_root or default_root()
    rows = []
    for p in find_stores(root):
        try:
            m = read_metadata(p)
        except StoreError as e:
            rows.append({"path": str(p), "complete": f"DAMAGED: {e}"})
            continue
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        rows.append({"dataset": m["dataset"]["name"], "model": m["model"]["name"], "split": m["split"],
                     "N": m["num_samples"], "layers": m["num_layers"], "width": m["width"], "dtype": m["dtype"],
                     "size_mb": f"{size / 2**20:.1f}", "complete": "yes" if m.get("complete") else "NO",
                     "path": str(p)})
    if not rows:
        typer.echo(f"no stores under {root}")
        return
    typer.echo(_table(rows, ["dataset", "model", "split", "N", "layers", "width", "dtype", "size_mb", "complete", "path"]))


@app.command()
def probe(
    head: str = typer.Option("alf", help="head name, comma-separated names, or 'all' (every head the store supports)"),
    dataset: Optional[str] = typer.Option(None, help="dataset name as recorded in the stores (optional if one)"),
    model: Optional[str] = typer.Option(None, help="model name as recorded in the stores (optional if one)"),
    store_root: Optional[Path] = typer.Option(None, help="where the stores are (default $ALF_FEATURES or ./features)"),
    protocol: str = typer.Option("paper", "--protocol", "--grid",
                                 help="paper (the authors' runs) | clean (paper, clean validation) | quick (CPU)"),
    out: Path = typer.Option(Path("results"), help="results folder"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    allow_incomplete: bool = typer.Option(False, help="probe stores whose extraction did not finish"),
    tap: Optional[str] = typer.Option(None, help="probe a module tap of a `--taps modules` store, e.g. ffn_activation"),
    verify: bool = typer.Option(True, help="check every chunk's checksum before training"),
    distributed: bool = typer.Option(False, help="one rank of a torchrun job: ranks share each grid's "
                                     "configurations (implied when WORLD_SIZE > 1)"),
):
    """Train heads on stored tokens; write one JSON per (dataset, model, head) and a summary table."""
    from alfcache.format import default_root
    from probes import ranks as rank_group
    from probes.results import write_summary
    from probes.runner import discover, run_heads

    if distributed and "WORLD_SIZE" not in os.environ:
        raise ProbeError("--distributed needs a torch.distributed launcher (torchrun sets WORLD_SIZE)")
    ranks, device = rank_group.init(device)

    pairs = discover(store_root or default_root(), dataset, model)
    if len(pairs) > 1 and (dataset is None or model is None):
        names = ", ".join(f"{p.dataset} x {p.model}" for p in pairs)
        typer.echo(f"probing {len(pairs)} dataset x model pairs: {names}")
    heads = [h.strip() for h in head.split(",") if h.strip()]

    def show(rec):
        typer.echo(f"{rec['dataset']} | {rec['model']} | {rec['head']}: test balanced acc {rec['test_balanced_accuracy']:.2f}% "
                   f"(val {rec['val_balanced_accuracy']:.2f}%, lr={rec['chosen']['lr']:g} wd={rec['chosen']['wd']:g} "
                   f"dropout={rec['chosen']['dropout']:g}, {rec['params']:,} params)")

    for pair in pairs:
        run_heads(pair, heads, protocol, out, seed=seed, device=device, allow_incomplete=allow_incomplete,
                  on_result=show if ranks.rank == 0 else None, tap=tap, verify=verify)
    if ranks.rank > 0:
        return
    _, md, rows = write_summary(out)
    typer.echo("")
    typer.echo(md.read_text())
    typer.echo(f"results in {out}/ (summary.md, summary.csv, one JSON per head)")


@app.command()
def verify(stores: list[Path] = typer.Argument(..., help="store paths (.zarr folders or .h5 files)")):
    """Re-read every chunk of each store and check it against the checksums recorded at extraction."""
    from probes.features import verify_store

    for p in stores:
        typer.echo(f"{p}: ok ({verify_store(p)} chunks)")


@app.command()
def report(
    store_root: Optional[Path] = typer.Option(None, help="stores (default $ALF_FEATURES or ./features)"),
    results: Path = typer.Option(Path("results"), help="results folder written by `alf probe`"),
    out: Path = typer.Option(Path("reports"), help="report folder"),
    dataset: Optional[str] = typer.Option(None), model: Optional[str] = typer.Option(None),
    protocol: str = typer.Option("quick", "--protocol", "--grid", help="protocol of the per-layer linear probes"),
    cka: str = typer.Option("linear", help="linear | rbf (debiased CKA kernel)"),
    layers: bool = typer.Option(True, help="run the per-layer probes + CKA (needs the stores)"),
    modules: bool = typer.Option(True, help="for `--taps modules` stores: linear probe on every block x module"),
    seed: int = 0, device: str = "auto",
):
    """Per-layer accuracy + CKA plots, ALF heatmaps and tables against the paper, linked from index.md."""
    _report(store_root, results, out, dataset, model, protocol, cka, layers, seed, device, modules)


def _report(store_root, results, out, dataset, model, protocol, cka, layers, seed, device, modules=True) -> Path:
    from alfcache.format import default_root
    from probes.features import FeatureSet, check_compatible
    from probes.layerwise import layer_sweep
    from probes.report import alf_heatmap, comparison_tables, layer_report, write_index
    from probes.results import collect
    from probes.runner import discover

    sections: dict[str, list] = {"Per-layer linear probes and CKA": [], "ALF layer-attention heatmaps": [],
                                 "Tables": []}
    if layers:
        for pair in discover(store_root or default_root(), dataset, model, skip_unusable=True):
            train, test = FeatureSet.open(pair.train), FeatureSet.open(pair.test)
            check_compatible(train, test)
            rows = layer_sweep(train, test, protocol=protocol, seed=seed, device=device, kernel=cka)
            d = out / "layers" / pair.dataset.replace("/", "-") / pair.model.replace("/", "-").replace(":", "-")
            files = layer_report(rows, d, f"{pair.dataset} x {pair.model}")
            sections["Per-layer linear probes and CKA"].append((f"{pair.dataset} x {pair.model}", files["md"]))
            sections["Per-layer linear probes and CKA"].append((f"{pair.dataset} x {pair.model} (plot)", files["png"]))
            if modules and train.module_taps:
                from probes.layerwise import module_sweep
                from probes.report import module_report

                mfiles = module_report(module_sweep(train, test, protocol=protocol, seed=seed, device=device), d,
                                       f"{pair.dataset} x {pair.model}")
                sections.setdefault("Module-level probes", []).extend(
                    [(f"{pair.dataset} x {pair.model}", mfiles["md"]), (f"{pair.dataset} x {pair.model} (plot)", mfiles["png"])])
    if results.is_dir():
        for m in sorted({r["model"] for r in collect(results)}):
            files = alf_heatmap(results, m, out / "heatmaps")
            if files:
                sections["ALF layer-attention heatmaps"] += [(f"{m} (plot)", files["png"]), (f"{m} (CSV)", files["csv"])]
        for label, path in comparison_tables(results, out / "tables").items():
            sections["Tables"].append((label, path))
    index = write_index(out, sections)
    typer.echo(f"report: {index}")
    means = out / "tables" / "means_vs_paper.md"
    if means.exists():
        typer.echo(means.read_text())
    return index


@app.command()
def reproduce(
    models: str = typer.Option(",".join(["vit-s", "vit-b", "vit-l", "dinov2-s", "dinov2-b", "dinov2-l", "clip-b32",
                                          "clip-b16", "clip-l"]), help="comma-separated models"),
    datasets: Optional[str] = typer.Option(None, help="comma-separated datasets (default: the paper's)"),
    heads: str = typer.Option("all", help="comma-separated heads or all"),
    protocol: str = typer.Option("paper", "--protocol", "--grid", help="probe protocol (and the registry's "
                                 "extraction protocol: paper or clean)"),
    root: Path = typer.Option(Path("."), help="folder for features/, results/ and reports/"),
    device: str = typer.Option("auto"), workers: int = typer.Option(2), batch_size: int = typer.Option(128),
    dtype: str = typer.Option("float32", help="stored precision: float32 (as the authors) or float16 (half the disk)"),
    seed: int = 0,
):
    """The whole study: extract (complete stores skipped), probe every head, report. Rerun to resume."""

    import torch

    from alfcache.datasets import PAPER_DATASETS, check_dataset, dataset_size
    from alfcache.extract import ExtractConfig, extract as run_extract
    from alfcache.format import read_metadata
    from alfcache.plan import (check_model, estimate, free_bytes, hub_reachable, human_bytes, human_seconds,
                               model_facts)
    from probes.features import FeatureSet
    from probes.results import result_dir, write_summary
    from probes.runner import discover, run_heads
    from probes.heads import supported_heads

    model_list = [m for m in models.split(",") if m]
    dataset_list = [d for d in (datasets.split(",") if datasets else PAPER_DATASETS) if d]
    online = hub_reachable()
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    checks = [check_model(m, online) for m in model_list] + [check_dataset(d, online) for d in dataset_list]
    typer.echo(f"plan: {len(model_list)} models x {len(dataset_list)} datasets on {dev}; hub "
               f"{'reachable' if online else 'NOT reachable'}")
    for c in checks:
        typer.echo(f"  {'ok  ' if c.reachable else 'SKIP'} {c.kind} {c.name}: {c.reason}")
    ok_models = [c.name for c in checks if c.kind == "model" and c.reachable]
    ok_data = [c.name for c in checks if c.kind == "dataset" and c.reachable]
    total_s = total_b = 0.0
    for m in ok_models:
        facts = model_facts(m)
        if facts is None:
            typer.echo(f"  (no time/disk estimate for {m})")
            continue
        for d in ok_data:
            n = sum(dataset_size(d).values())
            e = estimate(facts, n, facts["depth"], dev.split(":")[0])
            total_s += e["seconds"]
            total_b += e["bytes"]
    features = root / "features"
    typer.echo(f"estimated extraction: {human_seconds(total_s)}, stores {human_bytes(total_b)} "
               f"(free: {human_bytes(free_bytes(root))})")
    if not ok_models or not ok_data:
        raise AlfError("nothing to run: no reachable model or dataset (see the plan above)")
    results = root / "results"
    head_list = [h for h in heads.split(",") if h]
    failed = []
    for d in ok_data:
        for m in ok_models:
            try:  # one broken pair must not stop a study that runs for days: note it and go on
                res = run_extract(ExtractConfig(model=m, dataset=d, out=features, device=device, workers=workers,
                                                batch_size=batch_size, dtype=dtype,
                                                protocol="clean" if protocol == "clean" else "paper"))
                for r in res:
                    typer.echo(f"{d} x {m} {r.split}: {r.status}")
                meta = read_metadata(res[0].path)
                for pair in discover(features, dataset=meta["dataset"]["name"], model=meta["model"]["name"]):
                    wanted = supported_heads(FeatureSet.open(pair.train)) if head_list == ["all"] else head_list
                    todo = [h for h in wanted
                            if not _result_done(result_dir(results, pair.dataset, pair.model), h, protocol, seed)]
                    typer.echo(f"{pair.dataset} x {pair.model}: {len(wanted) - len(todo)} heads done, "
                               f"running {todo or 'none'}")
                    if todo:
                        run_heads(pair, todo, protocol, results, seed=seed, device=device)
            except (AlfError, ProbeError, StoreError) as e:
                typer.secho(f"FAILED {d} x {m}: {e}", err=True, fg=typer.colors.RED)
                failed.append(f"{d} x {m}")
    write_summary(results)
    _report(features, results, root / "reports", None, None, "quick", "linear", True, seed, device)
    if failed:
        raise AlfError(f"{len(failed)} dataset x model pair(s) failed: {', '.join(failed)}; "
                       f"fix the cause and rerun to do only what is missing")


def _result_done(folder: Path, head: str, protocol: str, seed: int) -> bool:
    import json

    f = folder / f"{head.replace(':', '-')}.json"
    if not f.exists():
        return False
    rec = json.loads(f.read_text())
    return rec.get("protocol_name") == protocol and rec.get("seed") == seed and "test_balanced_accuracy" in rec


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        app()
    except (AlfError, ProbeError, StoreError) as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
