"""Result files a person can read: one JSON per (dataset, model, head), attention weights for heatmaps,
and a CSV + markdown table across everything in a results folder."""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np

from alfcache.format import write_atomic

log = logging.getLogger(__name__)

HEAD_ORDER = ["linear", "linear-clsap", "concat", "concat:middle+last", "concat:quarterly", "attentive",
              "alf:last", "alf:middle+last", "alf:quarterly", "alf", "alf-patches"]
COLUMNS = ["dataset", "model", "head", "test_balanced_accuracy", "test_balanced_accuracy_std", "n_seeds", "seeds",
           "chance", "test_top1", "val_balanced_accuracy", "lr", "wd", "dropout", "params", "train_seconds", "n_train",
           "n_test", "protocol", "model_source", "pretrained_weights", "weights_fingerprint", "extraction_protocol"]
PER_SEED = ("seed", "chosen", "val_balanced_accuracy", "test_balanced_accuracy", "test_top1", "steps_grid",
            "steps_final", "train_seconds_grid", "train_seconds_final")


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def combine_seeds(records: list[dict]) -> dict:
    """One result record from the same head trained with several seeds: the first seed's record, the scores
    replaced by their mean over seeds, with their standard deviation, and every seed's own figures kept."""
    rec = dict(records[0])
    for key in ("test_balanced_accuracy", "test_top1", "val_balanced_accuracy"):
        rec[key], rec[f"{key}_std"] = spread([r[key] for r in records])
    rec["seeds"] = [r["seed"] for r in records]
    rec["n_seeds"] = len(records)
    rec["per_seed"] = [{k: r.get(k) for k in PER_SEED} for r in records]
    return rec


def fmt_spread(mean: float, std: float | None, n: int | None) -> str:
    """'51.22' for one seed, '51.22 ± 0.91 (n=3)' for several."""
    if not n or n < 2:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f} (n={n})"


def _slug(s: str) -> str:
    out = "".join(ch if ch.isalnum() or ch in "-_.+" else "-" for ch in s).strip(".-")
    return out or "unnamed"


def result_dir(out: str | Path, dataset: str, model: str) -> Path:
    return Path(out) / _slug(dataset) / _slug(model)


def csv_text(rows: list[dict], fieldnames: list[str] | None = None) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fieldnames or list(rows[0]), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_result(out: str | Path, dataset: str, model: str, head: str, record: dict,
                 attention: np.ndarray | None = None, token_names: list[str] | None = None) -> Path:
    """Write `<out>/<dataset>/<model>/<head>.json` (+ `<head>_attention.npz/.csv` for attention heads), every
    file whole (temporary file + rename): a kill leaves the old file or the new one, never an empty one.
    The attention files come first, the JSON (which marks the head as done) last."""
    d = result_dir(out, dataset, model)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{_slug(head)}.json"
    if attention is not None:
        per_image = attention.mean(axis=1)  # (N, T): averaged over heads
        buf = io.BytesIO()
        np.savez_compressed(buf, per_image=per_image.astype(np.float32), token_names=np.asarray(token_names or []))
        write_atomic(d / f"{_slug(head)}_attention.npz", buf.getvalue())
        mean = per_image.mean(axis=0)
        rows = [{"token": name, "mean_attention": f"{v:.6f}"} for name, v in zip(token_names or range(len(mean)), mean)]
        write_atomic(d / f"{_slug(head)}_attention.csv", csv_text(rows, ["token", "mean_attention"]))
    write_atomic(path, json.dumps(record, indent=2, default=float))
    return path


def read_result(path: Path) -> dict | None:
    """A result record, or None (with a warning naming the file) when it is damaged; `_probe.json` files and
    other JSON without a test score are not results (None, silently)."""
    try:
        r = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        log.warning("result file %s is damaged (not readable JSON); skipped - rerun the probe to redo it", path)
        return None
    if not isinstance(r, dict) or "test_balanced_accuracy" not in r:
        return None
    return r


def collect(out: str | Path) -> list[dict]:
    """One row per result (dataset, model, head): scores as mean over seeds with their spread, the chance level,
    the chosen configuration (first seed) and where the features came from."""
    rows = []
    for p in sorted(Path(out).glob("*/*/*.json")):
        if p.name.endswith("_probe.json"):
            continue
        r = read_result(p)
        if r is None:
            continue
        chosen = r.get("chosen", {})
        rows.append({"dataset": r.get("dataset"), "model": r.get("model"), "head": r.get("head"),
                     "test_balanced_accuracy": round(r["test_balanced_accuracy"], 2),
                     "test_balanced_accuracy_std": round(r.get("test_balanced_accuracy_std", 0.0), 2),
                     "n_seeds": r.get("n_seeds", 1), "seeds": " ".join(map(str, r.get("seeds", [r.get("seed")]))),
                     "per_seed_test": [p["test_balanced_accuracy"] for p in r.get("per_seed", [])]
                     or [r["test_balanced_accuracy"]],
                     "chance": round(r["chance"], 2) if r.get("chance") else None,
                     "model_source": r.get("model_source"), "pretrained_weights": r.get("pretrained_weights"),
                     "weights_fingerprint": r.get("weights_fingerprint"),
                     "extraction_protocol": r.get("extraction_protocol"), "finished_at": r.get("finished_at"),
                     "test_top1": round(r.get("test_top1", float("nan")), 2),
                     "val_balanced_accuracy": round(r.get("val_balanced_accuracy", float("nan")), 2),
                     "lr": chosen.get("lr"), "wd": chosen.get("wd"), "dropout": chosen.get("dropout"),
                     "params": r.get("params"),
                     "train_seconds": round(r.get("train_seconds_grid", 0) + r.get("train_seconds_final", 0), 1),
                     "n_train": r.get("n_train_all"), "n_test": r.get("n_test"),
                     "protocol": r.get("protocol_name", r.get("grid_name"))})
    order = {h: i for i, h in enumerate(HEAD_ORDER)}
    rows.sort(key=lambda r: (str(r["dataset"]), str(r["model"]), order.get(r["head"], 99), str(r["head"])))
    return rows


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_summary(out: str | Path) -> tuple[Path, Path, list[dict]]:
    """`summary.csv` and `summary.md` over every result JSON under `out`."""
    out = Path(out)
    rows = collect(out)
    csv_path, md_path = out / "summary.csv", out / "summary.md"
    write_atomic(csv_path, csv_text(rows, COLUMNS) if rows else ",".join(COLUMNS) + "\n")
    shown = [{**r, "test balanced acc (%)": fmt_spread(r["test_balanced_accuracy"], r["test_balanced_accuracy_std"],
                                                       r["n_seeds"]),
              "weights": "pretrained" if r["pretrained_weights"] else "RANDOM"} for r in rows]
    short = ["dataset", "model", "head", "test balanced acc (%)", "chance", "test_top1", "val_balanced_accuracy", "lr",
             "wd", "dropout", "params", "train_seconds", "protocol", "weights"]
    random = sorted({r["model"] for r in rows if r["pretrained_weights"] is False})
    note = (f"\n**Random weights**: {', '.join(random)} - their numbers only show that the pipeline runs.\n"
            if random else "")
    write_atomic(md_path, "# Probe results\n\nBalanced top-1 accuracy (%) on the test split, mean ± standard deviation "
                          "over seeds (n = number of seeds; one number: one seed); chance = 100 / classes. "
                          "Hyper-parameters (first seed's) chosen on a stratified 20% validation split of train."
                          "\n" + note + "\n" + markdown_table(shown, short))
    return csv_path, md_path, rows
