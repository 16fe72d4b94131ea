"""Reports a researcher can put in a paper: seeds with spread, chance lines, honest labels, shared colour scales,
provenance - checked from what the pictures and tables claim (PNG text chunk, CSV, markdown), not just that the
files exist."""
import csv
import json
import re

import numpy as np
import pytest

from alfstudy.report import figure_facts


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two small random-weight models x digits, probed with 2 seeds, reported with 2 seeds."""
    from alfcache.backbones import build_random_model
    from alfcache.extract import ExtractConfig, extract

    root = tmp_path_factory.mktemp("rep")
    for name, depth, seed in (("ma", 3, 0), ("mb", 4, 1)):
        m = build_random_model(root / "models" / name, img_size=16, patch_size=4, embed_dim=32, depth=depth,
                               num_heads=2, seed=seed)
        extract(ExtractConfig(model=str(m), dataset="digits", out=root / "features", workers=0, progress=False))
    from alfstudy import probe as study_probe, report as study_report

    small = {"base": "quick", "min_steps": 40, "epochs": 2}  # the quick protocol, shortened for the suite
    lines = []
    study_probe.probe_stores(root / "features", ["linear", "alf"], root / "results", protocol=small, seeds=2,
                       echo=lines.append)
    study_report.build_report(root / "features", root / "results", root / "reports", protocol=small, seeds=2,
                       command="alf report --store-root features --seeds 2")
    return root, "\n".join(lines)


def test_seeds_give_mean_and_spread_everywhere(two_models):
    root, out = two_models
    result_lines = [line for line in out.splitlines() if line.startswith("digits |")]
    assert len(result_lines) == 4 and all("± " in line and "(n=2)" in line for line in result_lines)
    rec = json.loads(next((root / "results").rglob("alf.json")).read_text())
    assert rec["seeds"] == [0, 1] and rec["n_seeds"] == 2 and len(rec["per_seed"]) == 2
    accs = [s["test_balanced_accuracy"] for s in rec["per_seed"]]
    assert rec["test_balanced_accuracy"] == pytest.approx(np.mean(accs))
    assert rec["test_balanced_accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    assert (root / "results").rglob("alf_probe_seed1.safetensors")  # every seed's probe is kept
    summary = list(csv.DictReader(open(root / "results" / "summary.csv")))
    assert {r["n_seeds"] for r in summary} == {"2"} and all(float(r["chance"]) == 10.0 for r in summary)
    md = (root / "results" / "summary.md").read_text()
    assert "± " in md and "(n=2)" in md and "**Random weights**" in md
    table = (root / "reports" / "tables" / "table_local-ma.md").read_text()
    assert "(n=2)" in table and "| chance |" in table
    means = list(csv.DictReader(open(root / "reports" / "tables" / "means_vs_paper.csv")))
    assert all(r["seeds"] == "2" and r["ours_std_over_seeds"] != "" for r in means)


def test_layer_pictures_show_bands_chance_and_integer_ticks(two_models):
    root, _ = two_models
    for png in (root / "reports" / "layers").rglob("layers.png"):
        facts = figure_facts(png)
        assert facts["chance"] == pytest.approx(10.0) and facts["bands"] is True and facts["n_seeds"] == 2
        assert facts["panels"] == ["test balanced accuracy (%)", "linear CKA"]  # one panel per quantity
        ticks = facts["xticks"]
        assert ticks == list(range(1, len(ticks) + 1)) and facts["xticklabels"][-1] == "final\nnorm"
        assert all(lbl.isdigit() for lbl in facts["xticklabels"][:-1])
        assert facts["provenance"]["pretrained_weights"] is False and "alf report" in facts["provenance"]["command"]
        assert png.with_suffix(".svg").read_text().lstrip().startswith("<?xml")
        rows = list(csv.DictReader(open(png.with_name("layers.csv"))))
        assert all(float(r["test_balanced_accuracy_std"]) >= 0 and r["n_seeds"] == "2" for r in rows)
        # what the picture says it drew is what the table holds
        cls = [float(r["test_balanced_accuracy"]) for r in rows if r["kind"] == "cls"]
        np.testing.assert_allclose(facts["series"]["cls"]["mean"], cls, atol=1e-3)


def test_heatmaps_share_one_labelled_colour_scale(two_models):
    root, _ = two_models
    pngs = sorted((root / "reports" / "heatmaps").glob("*.png"))
    assert len(pngs) == 2
    facts = [figure_facts(p) for p in pngs]
    assert facts[0]["vmax"] == facts[1]["vmax"] and facts[0]["vmin"] == facts[1]["vmin"] == 0.0
    assert facts[0]["colorbar_label"].startswith("mean attention weight")
    biggest = max(float(v) for p in pngs for r in csv.DictReader(open(p.with_suffix(".csv")))
                  for k, v in r.items() if k != "dataset")
    assert facts[0]["vmax"] == pytest.approx(biggest, abs=1e-5)  # the scale covers both models' values


def test_index_says_where_every_number_came_from(two_models):
    root, _ = two_models
    index = (root / "reports" / "index.md").read_text()
    assert "**Random weights**" in index and "local-ma" in index and "local-mb" in index
    assert "Where the numbers come from" in index and "digits (10.0)" in index
    assert "`alf report --store-root" in index and "RANDOM" in index and "sha256:" in index
    links = re.findall(r"\]\(([^)]+)\)", index)
    assert links and all((root / "reports" / link).is_file() for link in links)


def test_short_reprs():
    from probes import FeatureSet, fit

    fs = FeatureSet.from_arrays(cls=np.random.default_rng(0).standard_normal((40, 2, 4)), labels=np.arange(40) % 2)
    assert repr(fs) == "FeatureSet(arrays / -: 40 rows x 2 layers x 4, 2 classes)"
    probe = fit(fs, "linear", protocol={"base": "quick", "lr": (0.1,), "wd": (1e-4,), "min_steps": 2, "epochs": 1},
                progress=False)
    text = repr(probe)
    assert text.startswith("FittedProbe(linear, 1 tokens, 2 classes, lr=0.1") and "\n" not in text and len(text) < 200
