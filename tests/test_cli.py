"""The user's path through the real CLI: models table, extract, ls, probe, result files."""
import csv
import json

import pytest

from conftest import run_alf


def test_models_table_lists_registry():
    p = run_alf("models", check=True)
    for name, tid, blocks, width in [("clip-l", "vit_large_patch14_clip_224.openai", 24, 1024),
                                     ("dinov2-b", "vit_base_patch14_dinov2.lvd142m", 12, 768),
                                     ("vit-s", "vit_small_patch16_224.augreg_in21k_ft_in1k", 12, 384),
                                     ("mae-l", "vit_large_patch16_224.mae", 24, 1024)]:
        line = next(l for l in p.stdout.splitlines() if l.startswith(name + " "))
        assert tid in line and f" {blocks} " in line and f" {width} " in line
    dino = next(l for l in p.stdout.splitlines() if l.startswith("dinov2-b "))
    assert " 257 " in dino  # the paper's 224 px input: 1 + 16*16 tokens


@pytest.mark.long
def test_extract_ls_probe_end_to_end(tiny_model, tmp_path):
    feats, res = tmp_path / "features", tmp_path / "results"
    p = run_alf("extract", "--model", f"local-dir:{tiny_model}", "--dataset", "digits", "--out", feats,
                "--workers", "0", check=True)
    assert "train: written" in p.stdout and "test: written" in p.stdout and "img/s" in p.stdout
    ls = run_alf("ls", feats, check=True).stdout
    assert "digits" in ls and "1347" in ls and "450" in ls and ls.count(" yes ") == 2
    p = run_alf("probe", "--store-root", feats, "--grid", "quick", "--head", "linear,alf", "--out", res, check=True)
    assert "| digits |" in p.stdout
    jsons = sorted(x.name for x in res.rglob("*.json"))
    assert "linear.json" in jsons and "alf.json" in jsons and "alf_probe.json" in jsons
    rec = json.loads(next(res.rglob("alf.json")).read_text())
    for k in ("chosen", "val_balanced_accuracy", "test_balanced_accuracy", "test_top1", "params", "grid_results",
              "train_seconds_grid", "batch_size", "seed", "weights_fingerprint"):
        assert k in rec, k
    assert rec["pretrained_weights"] is False and rec["n_test"] == 450
    assert 10.0 < rec["test_balanced_accuracy"] <= 100.0  # above chance (10 classes) on real digits
    att = list(csv.DictReader(open(next(res.rglob("alf_attention.csv")))))
    assert len(att) == 8 and abs(sum(float(r["mean_attention"]) for r in att) - 1) < 1e-4
    rows = list(csv.DictReader(open(res / "summary.csv")))
    assert [r["head"] for r in rows] == ["linear", "alf"]
    assert (res / "summary.md").read_text().count("| digits |") == 2
