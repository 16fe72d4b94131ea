"""Reports a person can read: per-layer accuracy + CKA plots, ALF layer-attention heatmaps, and
tables of heads x datasets next to the paper's numbers, all linked from one index.md."""
from __future__ import annotations

import csv
import io
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from alfcache.format import write_atomic

from .results import HEAD_ORDER, _slug, collect, csv_text, markdown_table

PAPER_CSV = Path(__file__).with_name("paper_results.csv")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write_csv(path: Path, rows: list[dict]) -> None:
    write_atomic(path, csv_text(rows))


def _save_fig(fig, path: Path) -> None:
    """A figure written whole (rendered in memory, then temporary file + rename)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip("."), dpi=110)
    write_atomic(path, buf.getvalue())


def layer_report(rows: list[dict], out_dir: Path, title: str) -> dict[str, Path]:
    """Per-layer linear-probe accuracy (CLS, AP) beside CKA with the last layer: PNG + markdown + CSV."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cka_key = next(k for k in rows[0] if k.startswith("cka_"))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax2 = ax.twinx()
    for kind, style in (("cls", "o-"), ("ap", "s-")):
        sel = [r for r in rows if r["kind"] == kind]
        x = [r["layer_index"] for r in sel]
        ax.plot(x, [r["test_balanced_accuracy"] for r in sel], style, label=f"linear probe, {kind.upper()}")
        ax2.plot(x, [r[cka_key] for r in sel], style.replace("-", "--"), alpha=0.5, label=f"CKA with last, {kind.upper()}")
    ax.set_xlabel("tapped layer")
    ax.set_ylabel("test balanced accuracy (%)")
    ax2.set_ylabel(cka_key.replace("_", " "))
    ax2.set_ylim(0, 1.05)
    ax.set_title(title)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [l.get_label() for l in lines], fontsize=7, loc="lower right")
    fig.tight_layout()
    png = out_dir / "layers.png"
    _save_fig(fig, png)
    plt.close(fig)
    _write_csv(out_dir / "layers.csv", rows)
    cols = ["token", "lr", "wd", "val_balanced_accuracy", "test_balanced_accuracy", cka_key]
    pretty = [{c: (round(r[c], 3) if isinstance(r[c], float) and c not in ("lr", "wd") else r[c]) for c in cols}
              for r in rows]
    md = out_dir / "layers.md"
    write_atomic(md, f"# {title}: per-layer linear probes and CKA\n\n![layers](layers.png)\n\n" + markdown_table(pretty, cols))
    return {"png": png, "md": md, "csv": out_dir / "layers.csv"}


def module_report(rows: list[dict], out_dir: Path, title: str) -> dict[str, Path]:
    """Blocks x modules accuracy (the module study's picture): heatmap PNG + markdown + CSV."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = [k for k in rows[0] if k not in ("block", "best_module")]
    mat = np.array([[r[k] for k in kinds] for r in rows])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 2))
    im = ax.imshow(mat, aspect="auto", cmap="magma")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"block {r['block']}" for r in rows], fontsize=8)
    ax.set_title(f"linear probe (mean token) per block and module\n{title}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, label="test balanced accuracy (%)")
    fig.tight_layout()
    png = out_dir / "modules.png"
    _save_fig(fig, png)
    plt.close(fig)
    _write_csv(out_dir / "modules.csv", rows)
    md = out_dir / "modules.md"
    write_atomic(md, f"# {title}: linear probe per block and module\n\n![modules](modules.png)\n\n"
                  + markdown_table(rows, ["block"] + kinds + ["best_module"]))
    return {"png": png, "md": md, "csv": out_dir / "modules.csv"}


def attention_matrix(results: Path, model: str, head: str = "alf") -> tuple[list[str], list[str], np.ndarray]:
    """Rows = datasets, columns = tokens: mean attention (over heads and test images) of `head`."""
    datasets, tokens, mat = [], None, []
    for path in sorted(Path(results).glob(f"*/{_slug(model)}/{_slug(head)}_attention.csv")):
        with open(path) as f:
            rows = list(csv.DictReader(f))
        names = [r["token"] for r in rows]
        if tokens is None:
            tokens = names
        if names != tokens:
            continue  # a different tap layout: not comparable in one heatmap
        datasets.append(path.parents[1].name)
        mat.append([float(r["mean_attention"]) for r in rows])
    return datasets, tokens or [], np.asarray(mat)


def alf_heatmap(results: Path, model: str, out_dir: Path, head: str = "alf") -> dict[str, Path] | None:
    datasets, tokens, mat = attention_matrix(results, model, head)
    if not datasets:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{_slug(model)}_{_slug(head)}_heatmap"
    _write_csv(out_dir / f"{stem}.csv", [{"dataset": d, **{t: f"{v:.6f}" for t, v in zip(tokens, row)}}
                                         for d, row in zip(datasets, mat)])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(7, 0.35 * len(tokens)), 0.45 * len(datasets) + 2.4))
    im = ax.imshow(mat, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(datasets)), datasets, fontsize=8)
    ax.set_xticks(range(len(tokens)), [t.replace("block", "b").replace(".norm2", "") for t in tokens], rotation=90,
                  fontsize=7)
    ax.set_title(f"{head} attention per layer token, mean over test images\n{model}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    png = out_dir / f"{stem}.png"
    _save_fig(fig, png)
    plt.close(fig)
    return {"png": png, "csv": out_dir / f"{stem}.csv"}


def paper_numbers() -> dict[tuple[str, str, str], float]:
    with open(PAPER_CSV) as f:
        return {(r["model"], r["dataset"], r["head"]): float(r["test_balanced_accuracy"]) for r in csv.DictReader(f)}


def comparison_tables(results: Path, out_dir: Path) -> dict[str, Path]:
    """Heads x datasets per model, and per-model head means beside the paper's (same datasets and all 19)."""
    rows = collect(results)
    paper = paper_numbers()
    out_dir.mkdir(parents=True, exist_ok=True)
    by_model = defaultdict(list)
    for r in rows:
        by_model[r["model"]].append(r)
    order = {h: i for i, h in enumerate(HEAD_ORDER)}
    files: dict[str, Path] = {}
    means = []
    for model, rs in sorted(by_model.items()):
        datasets = sorted({r["dataset"] for r in rs})
        heads = sorted({r["head"] for r in rs}, key=lambda h: (order.get(h, 99), h))
        acc = {(r["dataset"], r["head"]): r["test_balanced_accuracy"] for r in rs}
        table = []
        for h in heads:
            row = {"head": h}
            for d in datasets:
                ours, ref = acc.get((d, h)), paper.get((model, d, h))
                row[d] = "" if ours is None else (f"{ours:.2f}" if ref is None else f"{ours:.2f} ({ref:.2f})")
            table.append(row)
            have = [d for d in datasets if (d, h) in acc]
            m = float(np.mean([acc[(d, h)] for d in have]))
            same = [paper[(model, d, h)] for d in have if (model, d, h) in paper]
            all19 = [v for (pm, _, ph), v in paper.items() if pm == model and ph == h]
            means.append({"model": model, "head": h, "datasets": len(have), "ours_mean": round(m, 2),
                          "paper_mean_same_datasets": round(float(np.mean(same)), 2) if len(same) == len(have) else "",
                          "difference": round(m - float(np.mean(same)), 2) if len(same) == len(have) else "",
                          "paper_mean_19": round(float(np.mean(all19)), 2) if len(all19) == 19 else ""})
        stem = f"table_{_slug(model)}"
        _write_csv(out_dir / f"{stem}.csv", table)
        write_atomic(out_dir / f"{stem}.md", 
            f"# {model}: test balanced accuracy (%) per head and dataset\n\nIn brackets: the paper's number "
            f"where the paper reports this model, dataset and head.\n\n" + markdown_table(table, ["head"] + datasets))
        files[f"table:{model}"] = out_dir / f"{stem}.md"
    if means:
        cols = list(means[0])
        _write_csv(out_dir / "means_vs_paper.csv", means)
        write_atomic(out_dir / "means_vs_paper.md", 
            "# Mean test balanced accuracy per model and head vs the paper\n\n`paper_mean_same_datasets` averages the "
            "paper over exactly the datasets we ran, `difference` = ours - that; `paper_mean_19` is the paper's mean "
            "over its 19 datasets (the headline table). Blank: the paper does not report that model/head.\n\n"
            + markdown_table(means, cols))
        files["means"] = out_dir / "means_vs_paper.md"
    return files


def write_index(out_dir: Path, sections: dict[str, list[tuple[str, Path]]]) -> Path:
    lines = ["# alfcache report\n"]
    for title, links in sections.items():
        if not links:
            continue
        lines.append(f"\n## {title}\n")
        for label, path in links:
            lines.append(f"- [{label}]({os.path.relpath(path, out_dir)})")
    index = out_dir / "index.md"
    write_atomic(index, "\n".join(lines) + "\n")
    return index
