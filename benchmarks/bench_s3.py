"""Stores on object storage against local disk, on a real S3 server on loopback (moto's, tests/s3server.py): the
same `alf extract` into a folder and into a bucket, the same `alf probe` from each (and from the bucket through
--cache-dir), and the raw read of every token (FeatureSet.open + tokens of all rows) from each.
Targets: extract-to-S3 / extract-to-disk <= 1.1, probe-from-S3 / probe-from-disk <= 1.3 (whole `alf` commands).
Times alternate local / S3; best of `repeats`. The S3 server is Python (moto), slower per request than a real
service, and shares this machine's cores with the client: the ratios are upper bounds for a fast network."""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, report

sys.path.insert(0, str(ROOT / "tests"))
from s3server import S3Server  # noqa: E402


def alf(*args) -> float:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=ROOT)
    if p.returncode:
        sys.exit(f"alf {' '.join(map(str, args))} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t


def read_all(path) -> float:
    from probes.features import FeatureSet
    from probes.selection import TokenSpec

    t = time.perf_counter()
    fs = FeatureSet.open(path)
    x = fs.tokens(fs.rows, TokenSpec())
    assert np.isfinite(x).all()
    return time.perf_counter() - t


def main(repeats: int = 2, width: int = 192, depth: int = 12):
    from alfcache.backbones import build_random_model

    tmp = Path(tempfile.mkdtemp())
    model = build_random_model(tmp / "vit", img_size=32, patch_size=4, embed_dim=width, depth=depth,
                               num_heads=3, seed=0)
    with S3Server() as s3:
        os.environ.update(s3.env)
        s3.bucket("bench")
        t = {k: [] for k in ("ext_local", "ext_s3", "probe_local", "probe_s3", "probe_cache", "alf_local",
                             "alf_s3", "read_local", "read_s3")}
        for r in range(repeats):
            common = ["extract", "--model", f"local-dir:{model}", "--dataset", "digits", "--workers", "0",
                      "--overwrite"]
            t["ext_local"].append(alf(*common, "--out", tmp / "features"))
            t["ext_s3"].append(alf(*common, "--out", "s3://bench/features"))
            head = ["probe", "--head", "linear", "--protocol", "quick"]
            t["probe_local"].append(alf(*head, "--store-root", tmp / "features", "--out", tmp / f"rl{r}"))
            t["probe_s3"].append(alf(*head, "--store-root", "s3://bench/features", "--out", tmp / f"rs{r}"))
            alf_head = ["probe", "--head", "alf", "--protocol", "quick"]
            t["alf_local"].append(alf(*alf_head, "--store-root", tmp / "features", "--out", tmp / f"al{r}"))
            t["alf_s3"].append(alf(*alf_head, "--store-root", "s3://bench/features", "--out", tmp / f"as{r}"))
            shutil.rmtree(tmp / "cache", ignore_errors=True)
            t["probe_cache"].append(alf(*head, "--store-root", "s3://bench/features", "--out", tmp / f"rc{r}",
                                        "--cache-dir", tmp / "cache"))
            t["read_local"].append(read_all(next((tmp / "features").rglob("train.zarr"))))
            t["read_s3"].append(read_all(f"s3://bench/features/digits/local-vit/train.zarr"))
        from alfcache.format import size_of

        size = size_of("s3://bench/features/digits/local-vit/train.zarr")
    best = {k: min(v) for k, v in t.items()}
    ratio = lambda a, b: f"{best[a] / best[b]:.2f}"  # noqa: E731
    rows = [
        ("alf extract: local disk (s)", f"{best['ext_local']:.1f}", ""),
        ("alf extract: S3 (s)", f"{best['ext_s3']:.1f}", ""),
        ("extract S3 / disk", ratio("ext_s3", "ext_local"), "<= 1.1"),
        ("alf probe: local disk (s)", f"{best['probe_local']:.1f}", ""),
        ("alf probe: S3 (s)", f"{best['probe_s3']:.1f}", ""),
        ("probe S3 / disk", ratio("probe_s3", "probe_local"), "<= 1.3"),
        ("probe S3 --cache-dir (first, copies) / disk", ratio("probe_cache", "probe_local"), ""),
        ("alf probe --head alf: local disk (s)", f"{best['alf_local']:.1f}", ""),
        ("alf probe --head alf: S3 (s)", f"{best['alf_s3']:.1f}", ""),
        ("probe --head alf S3 / disk", ratio("alf_s3", "alf_local"), "<= 1.3"),
        ("read every token: disk (s)", f"{best['read_local']:.2f}", ""),
        ("read every token: S3 (s)", f"{best['read_s3']:.2f}", ""),
        ("read S3 / disk", ratio("read_s3", "read_local"), ""),
    ]
    report("bench_s3", rows, {"times": t, "train_store_bytes": size, "model": f"ViT width {width} depth {depth}, "
                              f"32 px / patch 4 (65 tokens), random weights", "dataset": "digits (1347 + 450)",
                              "repeats": repeats})


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=2)
    main(ap.parse_args().repeats)
