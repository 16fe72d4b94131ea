"""One decode for several models: a 3-model pass (`extract_many`) against three single-model runs, on a
decode-bound case - small random-weight ViTs over full-size JPEGs - and, beside it, the ceiling: the same three
models' forwards on batches already decoded and preprocessed in memory. Two cases: three models of one
preprocessing (as ViT-S/B/L, or the study's 9 models, which have 3 pipelines), and three of three different
preprocessings (each image still resized once per model). Target: pass / sum of single runs <= 0.5 (times
alternated, best of `repeats`)."""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import report
from alfcache.backbones import build_random_model, load_backbone
from alfcache.datasets import open_source
from alfcache.extract import ExtractConfig, extract, extract_many


def photos(root: Path, n: int, size=(1600, 1200)) -> Path:
    """Full-size JPEGs with smooth, photo-like content (noise would not compress like a photo)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
    for i in range(n):
        d = root / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        f = rng.uniform(0.002, 0.02, 3)
        img = np.stack([127 + 120 * np.sin(f[c] * xx + f[(c + 1) % 3] * yy + c) for c in range(3)], -1)
        img += rng.normal(0, 6, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i:04d}.jpg", quality=90)
    return root


def main(n: int = 96, workers: int = 1, batch: int = 32, repeats: int = 2):
    tmp = Path(tempfile.mkdtemp())
    data = photos(tmp / "photos", n)
    shared = dict(interpolation="bicubic", crop_pct=0.9, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    cases = {
        "one preprocessing": [dict(img_size=32, depth=3, seed=0, pretrained_cfg_overlay=shared),
                              dict(img_size=32, depth=4, seed=1, pretrained_cfg_overlay=shared),
                              dict(img_size=32, depth=6, seed=2, pretrained_cfg_overlay=shared)],
        "three preprocessings": [dict(img_size=32, depth=4, seed=0),
                                 dict(img_size=48, depth=4, seed=1, pretrained_cfg_overlay=dict(
                                     interpolation="bilinear", crop_pct=0.875, mean=(0.5,) * 3, std=(0.5,) * 3)),
                                 dict(img_size=40, depth=4, seed=2, pretrained_cfg_overlay=dict(crop_pct=1.0))],
    }
    rows, facts = [("images (full-size JPEG, 1600x1200)", f"{n}", "")], {"workers": workers, "batch": batch}
    for case, specs in cases.items():
        names = [f"local-dir:{build_random_model(tmp / case / str(i), patch_size=8, embed_dim=64, num_heads=2, **k)}"
                 for i, k in enumerate(specs)]
        single, multi, forward = run_case(names, data, tmp / case, workers, batch, repeats)
        s, mp = min(single), min(multi)
        rows += [(f"{case}: three single-model runs (sum)", f"{s:.2f} s", ""),
                 (f"{case}: one 3-model pass", f"{mp:.2f} s", ""),
                 (f"{case}: 3-model pass / sum of single runs", f"{mp / s:.2f}", "<= 0.5"),
                 (f"{case}: ceiling, three forwards on preloaded batches / sum", f"{forward / s:.2f}", "lower bound"),
                 (f"{case}: per run single / multi (s)", ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(single, multi)), "")]
        facts[case] = {"single_s": single, "multi_s": multi, "forward_s": forward}
    report("bench_multi", rows, facts)


def run_case(names, data, tmp, workers, batch, repeats):
    base = dict(dataset=f"imagefolder:{data}", splits=["train"], workers=workers, batch_size=batch, progress=False,
                overwrite=True)
    single, multi = [], []
    for r in range(repeats):  # alternated: the machine's speed drifts
        t = time.perf_counter()
        for m in names:
            extract(ExtractConfig(model=m, out=tmp / "single", **base))
        single.append(time.perf_counter() - t)
        t = time.perf_counter()
        extract_many(ExtractConfig(model=names[0], out=tmp / "multi", **base), names)
        multi.append(time.perf_counter() - t)
    src = open_source(f"imagefolder:{data}", "train")
    forward = 0.0
    for m in names:  # the ceiling: forwards alone on batches already decoded and preprocessed
        bb = load_backbone(m)
        tf = bb.transform()
        xs = torch.stack([tf(src.load(i)) for i in range(len(src))])
        with torch.inference_mode():
            t = time.perf_counter()
            for s in range(0, len(xs), batch):
                bb.forward(xs[s:s + batch])
            forward += time.perf_counter() - t
    return single, multi, forward

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    main(a.n, a.workers, a.batch, a.repeats)
