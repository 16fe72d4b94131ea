"""Reports a person can read and put in a paper: per-layer accuracy and CKA (two panels, spread over seeds as a
band, the chance level drawn), ALF layer-attention heatmaps on one colour scale across models, tables of heads x
datasets with mean ± std over seeds next to the paper's numbers, all linked from one index.md that says where
every number came from (model, weights, protocols, seeds, date, the command).

Every picture is written as PNG and SVG; the PNG carries what it shows as JSON in its `alfcache` text chunk
(chance level, bands, ticks, colour scale, provenance), so a test or a reader can check the picture's claims.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from alfcache.format import write_atomic

from probes.results import HEAD_ORDER, _slug, collect, csv_text, fmt_spread, markdown_table, spread

PAPER_CSV = Path(__file__).with_name("paper_results.csv")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write_csv(path: Path, rows: list[dict]) -> None:
    write_atomic(path, csv_text(rows))


def save_figure(fig, png: Path, facts: dict) -> dict[str, Path]:
    """The figure as PNG (with `facts` as JSON in its `alfcache` text chunk) and SVG, each written whole."""
    for fmt in ("png", "svg"):
        buf = io.BytesIO()
        meta = {"alfcache": json.dumps(facts, default=str)} if fmt == "png" else {"Description": facts.get("title", "")}
        fig.savefig(buf, format=fmt, dpi=110, metadata=meta)
        write_atomic(png.with_suffix(f".{fmt}"), buf.getvalue())
    return {"png": png, "svg": png.with_suffix(".svg")}


def figure_facts(png: Path) -> dict:
    """What a picture written by `save_figure` claims to show."""
    from PIL import Image

    with Image.open(png) as im:
        return json.loads(im.text["alfcache"])


def provenance_line(prov: dict | None) -> str:
    if not prov:
        return ""
    weights = "pretrained weights" if prov.get("pretrained_weights") else "**RANDOM weights** (numbers only exercise the pipeline)"
    return (f"_Model {prov.get('model_source')} ({weights}; fingerprint {str(prov.get('weights_fingerprint'))[:19]}...), "
            f"extraction protocol {prov.get('extraction_protocol')}, probe protocol {prov.get('protocol')}, "
            f"made {prov.get('date')} by `{prov.get('command')}`._\n\n")


# ------------------------------------------------------------------------------------------ per-layer probes
def _layer_ticks(rows: list[dict]) -> tuple[list[int], list[str]]:
    """Integer ticks 1..L; the last named for what it is (the final norm, or the model's output)."""
    idx = sorted({r["layer_index"] for r in rows})
    names = {r["layer_index"]: r["layer"] for r in rows}
    labels = [("final\nnorm" if names[i] in ("final_norm", "layer_final") else str(i)) for i in idx]
    return idx, labels


def layer_report(rows: list[dict], out_dir: Path, title: str, prov: dict | None = None) -> dict[str, Path]:
    """Per-layer linear-probe accuracy (CLS, AP; band = ± one standard deviation over seeds; dashed = chance) in
    one panel, CKA of each layer with the last in another: PNG + SVG + markdown + CSV."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cka_key = next(k for k in rows[0] if k.startswith("cka_"))
    kernel = cka_key.split("_")[1]
    chance, n_seeds = rows[0]["chance"], rows[0]["n_seeds"]
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    drawn = {}
    # distinct styles, so that equal curves stay visible: CLS solid with large open circles under AP dashed with
    # small filled squares
    styles = {"cls": dict(marker="o", color="tab:blue", linestyle="-", markersize=9, markerfacecolor="none", zorder=3),
              "ap": dict(marker="s", color="tab:orange", linestyle="--", markersize=4, zorder=4)}
    for kind in ("cls", "ap"):
        sel = [r for r in rows if r["kind"] == kind]
        if not sel:
            continue
        x = np.array([r["layer_index"] for r in sel])
        m = np.array([r["test_balanced_accuracy"] for r in sel])
        sd = np.array([r["test_balanced_accuracy_std"] for r in sel])
        ax.plot(x, m, label=f"{kind.upper()} token", **styles[kind])
        if n_seeds > 1:
            ax.fill_between(x, m - sd, m + sd, color=styles[kind]["color"], alpha=0.2, linewidth=0)
        ax2.plot(x, [r[cka_key] for r in sel], label=f"{kind.upper()} token", **styles[kind])
        drawn[kind] = {"mean": m.round(3).tolist(), "std": sd.round(3).tolist()}
    ax.axhline(chance, color="grey", linestyle=":", linewidth=1.2, label=f"chance ({chance:.1f}%)")
    ticks, labels = _layer_ticks(rows)
    ax.set_ylim(0, 100)
    ax.set_ylabel("test balanced accuracy (%)")
    ax.set_title(f"{title}: linear probe per layer" + (f" (mean ± sd over {n_seeds} seeds)" if n_seeds > 1 else " (1 seed)"),
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel(f"{kernel} CKA with the last layer")
    ax2.set_xlabel("layer (tapped block; the last is the final norm)")
    ax2.set_xticks(ticks, labels)
    ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    facts = {"title": title, "kind": "layers", "chance": chance, "bands": n_seeds > 1, "n_seeds": n_seeds,
             "xticks": ticks, "xticklabels": labels, "panels": ["test balanced accuracy (%)", f"{kernel} CKA"],
             "series": drawn, "provenance": prov}
    files = save_figure(fig, out_dir / "layers.png", facts)
    plt.close(fig)
    _write_csv(out_dir / "layers.csv", rows)
    cols = ["token", "test balanced acc (%)", "chance", "lr", "wd", "val_balanced_accuracy", cka_key]
    shown = [{**r, "test balanced acc (%)": fmt_spread(r["test_balanced_accuracy"], r["test_balanced_accuracy_std"],
                                                       r["n_seeds"]),
              "val_balanced_accuracy": round(r["val_balanced_accuracy"], 2), cka_key: round(r[cka_key], 3),
              "chance": round(r["chance"], 2)} for r in rows]
    md = out_dir / "layers.md"
    write_atomic(md, f"# {title}: per-layer linear probes and CKA\n\n{provenance_line(prov)}![layers](layers.png) "
                     f"([SVG](layers.svg))\n\nChance = 100 / classes. lr / wd: the first seed's choice.\n\n"
                 + markdown_table(shown, cols))
    return {**files, "md": md, "csv": out_dir / "layers.csv"}


def module_report(rows: list[dict], out_dir: Path, title: str, prov: dict | None = None) -> dict[str, Path]:
    """Blocks x modules accuracy (the module study's picture): heatmap PNG + SVG + markdown + CSV."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = [k for k in rows[0] if k not in ("block", "best_module")]
    mat = np.array([[r[k] for k in kinds] for r in rows])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 2))
    im = ax.imshow(mat, aspect="auto", cmap="magma", vmin=0, vmax=100)
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"block {r['block']}" for r in rows], fontsize=8)
    ax.set_xlabel("module inside the block")
    ax.set_ylabel("block")
    ax.set_title(f"linear probe (mean token) per block and module\n{title}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, label="test balanced accuracy (%)")
    fig.tight_layout()
    files = save_figure(fig, out_dir / "modules.png", {"title": title, "kind": "modules", "vmin": 0, "vmax": 100,
                                                        "colorbar_label": "test balanced accuracy (%)", "provenance": prov})
    plt.close(fig)
    _write_csv(out_dir / "modules.csv", rows)
    md = out_dir / "modules.md"
    write_atomic(md, f"# {title}: linear probe per block and module\n\n{provenance_line(prov)}![modules](modules.png)\n\n"
                 + markdown_table(rows, ["block"] + kinds + ["best_module"]))
    return {**files, "md": md, "csv": out_dir / "modules.csv"}


# ------------------------------------------------------------------------------------------ heatmaps
def attention_matrix(results: Path, model: str, head: str = "alf") -> tuple[list[str], list[str], np.ndarray]:
    """Rows = datasets, columns = tokens: mean attention (over heads, test images and seeds) of `head`."""
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


def _token_label(t: str) -> str:
    layer, _, kind = t.partition(":")
    layer = "final" if layer in ("final_norm", "layer_final") else layer.replace("block", "b").replace(".norm2", "")
    return f"{layer} {kind.upper()}" if kind else layer


def alf_heatmaps(results: Path, models: list[str], out_dir: Path, head: str = "alf",
                 provenance: dict | None = None) -> dict[str, dict[str, Path]]:
    """One heatmap per model (rows datasets, columns layer tokens), all on one colour scale so models compare."""
    mats = {m: attention_matrix(results, m, head) for m in models}
    mats = {m: v for m, v in mats.items() if v[0]}
    if not mats:
        return {}
    vmax = float(max(v[2].max() for v in mats.values()))
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    files = {}
    label = "mean attention weight (over heads, test images, seeds)"
    for model, (datasets, tokens, mat) in mats.items():
        stem = f"{_slug(model)}_{_slug(head)}_heatmap"
        _write_csv(out_dir / f"{stem}.csv", [{"dataset": d, **{t: f"{v:.6f}" for t, v in zip(tokens, row)}}
                                             for d, row in zip(datasets, mat)])
        fig, ax = plt.subplots(figsize=(max(7, 0.35 * len(tokens)), 0.45 * len(datasets) + 2.6))
        im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_yticks(range(len(datasets)), datasets, fontsize=8)
        ax.set_xticks(range(len(tokens)), [_token_label(t) for t in tokens], rotation=90, fontsize=7)
        ax.set_xlabel("layer token (block, CLS / AP)")
        ax.set_ylabel("dataset")
        ax.set_title(f"{head} attention per layer token, {model}\n(colour scale shared by all models: 0 - {vmax:.3f})",
                     fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03, label=label)
        fig.tight_layout()
        prov = (provenance or {}).get(model)
        files[model] = {**save_figure(fig, out_dir / f"{stem}.png", {
            "title": f"{head} heatmap {model}", "kind": "heatmap", "vmin": 0.0, "vmax": vmax,
            "colorbar_label": label, "models_sharing_scale": sorted(mats), "provenance": prov}),
            "csv": out_dir / f"{stem}.csv"}
        plt.close(fig)
    return files


# ------------------------------------------------------------------------------------------ tables
def paper_numbers() -> dict[tuple[str, str, str], float]:
    with open(PAPER_CSV) as f:
        return {(r["model"], r["dataset"], r["head"]): float(r["test_balanced_accuracy"]) for r in csv.DictReader(f)}


def _model_means(rs: list[dict], head: str, datasets: list[str]) -> tuple[float, float, int]:
    """A head's mean over datasets, with its spread over seeds (the dataset mean of each seed)."""
    cells = {r["dataset"]: r["per_seed_test"] for r in rs if r["head"] == head and r["dataset"] in datasets}
    n = min(len(v) for v in cells.values())
    per_seed = [float(np.mean([cells[d][s] for d in cells])) for s in range(n)]
    m, sd = spread(per_seed)
    return m, sd, n


def comparison_tables(results: Path, out_dir: Path, prov_note: str = "") -> dict[str, Path]:
    """Heads x datasets per model (mean ± std over seeds, the paper's number in brackets), and per-model head means
    beside the paper's (same datasets and all 19)."""
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
        cell = {(r["dataset"], r["head"]): r for r in rs}
        table = []
        for h in heads:
            row = {"head": h}
            for d in datasets:
                r, ref = cell.get((d, h)), paper.get((model, d, h))
                ours = "" if r is None else fmt_spread(r["test_balanced_accuracy"], r["test_balanced_accuracy_std"],
                                                         r["n_seeds"])
                row[d] = ours if ref is None or not ours else f"{ours} [{ref:.2f}]"
            table.append(row)
            have = [d for d in datasets if (d, h) in cell]
            m, sd, n = _model_means(rs, h, have)
            same = [paper[(model, d, h)] for d in have if (model, d, h) in paper]
            all19 = [v for (pm, _, ph), v in paper.items() if pm == model and ph == h]
            comparable = len(same) == len(have)
            means.append({"model": model, "head": h, "datasets": len(have), "seeds": n, "ours_mean": round(m, 2),
                          "ours_std_over_seeds": round(sd, 2),
                          "paper_mean_same_datasets": round(float(np.mean(same)), 2) if comparable else "",
                          "difference": round(m - float(np.mean(same)), 2) if comparable else "",
                          "paper_mean_19": round(float(np.mean(all19)), 2) if len(all19) == 19 else ""})
        chance = {d: next(r["chance"] for r in rs if r["dataset"] == d) for d in datasets}
        table.append({"head": "chance", **{d: f"{c:.2f}" if c else "" for d, c in chance.items()}})
        stem = f"table_{_slug(model)}"
        _write_csv(out_dir / f"{stem}.csv", table)
        write_atomic(out_dir / f"{stem}.md",
                     f"# {model}: test balanced accuracy (%) per head and dataset\n\n{prov_note}Mean ± standard "
                     f"deviation over seeds (n = seeds; one number: one seed). In brackets: the paper's number where "
                     f"the paper reports this model, dataset and head. Last row: chance (100 / classes).\n\n"
                     + markdown_table(table, ["head"] + datasets))
        files[f"table:{model}"] = out_dir / f"{stem}.md"
    if means:
        _write_csv(out_dir / "means_vs_paper.csv", means)
        write_atomic(out_dir / "means_vs_paper.md",
                     "# Mean test balanced accuracy per model and head vs the paper\n\n" + prov_note +
                     "`ours_mean` averages our datasets; `ours_std_over_seeds` is the standard deviation of that "
                     "average across seeds. `paper_mean_same_datasets` averages the paper over exactly the datasets we "
                     "ran, `difference` = ours - that; `paper_mean_19` is the paper's mean over its 19 datasets (the "
                     "headline table). Blank: the paper does not report that model/head.\n\n"
                     + markdown_table(means, list(means[0])))
        files["means"] = out_dir / "means_vs_paper.md"
    return files


# ------------------------------------------------------------------------------------------ index
def provenance_table(provenance: dict[str, dict]) -> str:
    rows = [{"model": m, "source": p.get("model_source"),
             "weights": "pretrained" if p.get("pretrained_weights") else "RANDOM",
             "weights fingerprint": str(p.get("weights_fingerprint"))[:23] + "...",
             "extraction protocol": p.get("extraction_protocol"), "probe protocol": p.get("protocol"),
             "seeds": p.get("seeds"), "datasets (chance %)": p.get("datasets")} for m, p in sorted(provenance.items())]
    return markdown_table(rows, list(rows[0])) if rows else ""


def write_index(out_dir: Path, sections: dict[str, list[tuple[str, Path]]], provenance: dict[str, dict] | None = None,
                command: str = "") -> Path:
    """index.md: where the numbers came from (a banner if any weights are random), then every file by section."""
    lines = ["# alfcache report\n", f"Made {time.strftime('%Y-%m-%d %H:%M')} by `{command or 'alf report'}`. Scores are "
             "balanced top-1 accuracy (%) on the test split, mean ± standard deviation over seeds where several ran; "
             "chance = 100 / classes (shown per dataset below and in every table and plot).\n"]
    provenance = provenance or {}
    random = sorted(m for m, p in provenance.items() if p.get("pretrained_weights") is False)
    if random:
        lines.append(f"**Random weights**: {', '.join(random)} were extracted with random weights; their numbers only "
                     f"show that the pipeline runs, not what the model knows.\n")
    if provenance:
        lines += ["\n## Where the numbers come from\n", provenance_table(provenance)]
    for title, links in sections.items():
        if not links:
            continue
        lines.append(f"\n## {title}\n")
        for label, path in links:
            lines.append(f"- [{label}]({os.path.relpath(path, out_dir)})")
    index = out_dir / "index.md"
    write_atomic(index, "\n".join(lines) + "\n")
    return index


# ------------------------------------------------------------------------------------------ the report
def _store_provenance(meta: dict, protocol: str, seeds: int, command: str) -> dict:
    m = meta.get("model", {})
    return {"model_source": m.get("source_id"), "pretrained_weights": m.get("pretrained_weights"),
            "weights_fingerprint": m.get("fingerprint"), "extraction_protocol": meta.get("extraction", {}).get("protocol"),
            "protocol": protocol, "seeds": seeds, "date": time.strftime("%Y-%m-%d %H:%M"), "command": command}


def _results_provenance(rows: list[dict]) -> dict[str, dict]:
    """Per model, from the results: weights, protocols, seeds and each dataset's chance level."""
    out: dict[str, dict] = {}
    for r in rows:
        p = out.setdefault(r["model"], {"model_source": r["model_source"], "pretrained_weights": r["pretrained_weights"],
                                        "weights_fingerprint": r["weights_fingerprint"],
                                        "extraction_protocol": r["extraction_protocol"], "protocol": set(),
                                        "seeds": set(), "datasets": {}})
        p["protocol"].add(str(r["protocol"]))
        p["seeds"].add(r["seeds"])
        p["datasets"][r["dataset"]] = r["chance"]
    for p in out.values():
        p["protocol"] = ", ".join(sorted(p["protocol"]))
        p["seeds"] = "; ".join(sorted(p["seeds"]))
        p["datasets"] = ", ".join(f"{d} ({c})" for d, c in sorted(p["datasets"].items()))
    return out


def build_report(store_root: Path, results: Path, out: Path, *, dataset: str | None = None,
                 model: str | None = None, protocol: str = "quick", cka: str = "linear", layers: bool = True,
                 modules: bool = True, seed: int = 0, seeds: int = 1, device: str = "auto",
                 command: str = "") -> Path:
    """Per-layer accuracy + CKA, module pictures, ALF heatmaps and tables against the paper, linked from
    index.md, with where every number came from."""
    from probes.features import FeatureSet, check_compatible
    from .layerwise import layer_sweep, module_sweep
    from probes.results import _slug, collect
    from probes.runner import discover

    sections: dict[str, list] = {"Per-layer linear probes and CKA": [], "ALF layer-attention heatmaps": [],
                                 "Tables": []}
    provenance: dict[str, dict] = {}
    if layers:
        for pair in discover(store_root, dataset, model, skip_unusable=True):
            train, test = FeatureSet.open(pair.train), FeatureSet.open(pair.test)
            check_compatible(train, test)
            prov = _store_provenance(train.meta, protocol, seeds, command)
            rows = layer_sweep(train, test, protocol=protocol, seed=seed, seeds=seeds, device=device, kernel=cka)
            provenance.setdefault(pair.model, {**prov, "datasets": ""})
            d = out / "layers" / _slug(pair.folder) / _slug(pair.model)
            label = f"{pair.dataset} x {pair.model}"
            files = layer_report(rows, d, label, prov)
            sections["Per-layer linear probes and CKA"] += [(label, files["md"]), (f"{label} (plot)", files["png"])]
            if modules and train.module_taps:
                mfiles = module_report(module_sweep(train, test, protocol=protocol, seed=seed, seeds=seeds,
                                                    device=device), d, label, prov)
                sections.setdefault("Module-level probes", []).extend(
                    [(label, mfiles["md"]), (f"{label} (plot)", mfiles["png"])])
    if results.is_dir():
        rows = collect(results)
        provenance.update(_results_provenance(rows))
        for m, files in alf_heatmaps(results, sorted({r["model"] for r in rows}), out / "heatmaps",
                                     provenance=provenance).items():
            sections["ALF layer-attention heatmaps"] += [(f"{m} (plot)", files["png"]), (f"{m} (CSV)", files["csv"])]
        note = f"_Made by `{command or 'alf report'}`; provenance of every model in ../index.md._\n\n"
        for label, path in comparison_tables(results, out / "tables", note).items():
            sections["Tables"].append((label, path))
    return write_index(out, sections, provenance, command)
