"""Cost growth: extraction and probing time vs N (1x, 2x, 4x) and vs depth (B-like 12 vs L-like 24 blocks at
one width, so layers double): the log-log slope (1.0 = linear)."""
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import report
from alfcache.backbones import build_random_model
from alfcache.extract import ExtractConfig, extract
from probes import FeatureSet, Protocol, fit


def _imagefolder(root: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "train" / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i:05d}.png")
    return root


def slope(xs, ys):
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main(base_n=512):
    tmp = Path(tempfile.mkdtemp())
    model = build_random_model(tmp / "m", img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3)
    ns, ext_s, probe_s = [base_n, 2 * base_n, 4 * base_n], [], []
    grid = Protocol(val_noise=False, lr=(1e-2,), wd=(1e-4,), dropout=(0.0,), epochs=10, min_steps=1, batch_size=256)
    for n in ns:
        folder = _imagefolder(tmp / f"img{n}", n)
        t = time.perf_counter()
        res = extract(ExtractConfig(model=str(model), dataset=f"imagefolder:{folder}", splits=["train"],
                                    out=tmp / f"f{n}", workers=1, batch_size=128, progress=False))
        ext_s.append(time.perf_counter() - t)
        fs = FeatureSet.open(res[0].path)
        t = time.perf_counter()
        fit(fs, "alf", protocol=grid, progress=False)  # epochs fixed: steps grow with N
        probe_s.append(time.perf_counter() - t)
    depth_s = {}
    for depth in (12, 24):
        m = build_random_model(tmp / f"d{depth}", img_size=32, patch_size=4, embed_dim=96, depth=depth, num_heads=3)
        t = time.perf_counter()
        res = extract(ExtractConfig(model=str(m), dataset="digits", splits=["test"], out=tmp / f"fd{depth}",
                                    workers=1, batch_size=128, progress=False))
        e = time.perf_counter() - t
        fs = FeatureSet.open(res[0].path)
        t = time.perf_counter()
        fit(fs, "alf", protocol=grid, progress=False)
        depth_s[depth] = (e, time.perf_counter() - t)
    report("scaling", [
        ("extraction s at N = " + "/".join(map(str, ns)), "/".join(f"{s:.1f}" for s in ext_s), ""),
        ("extraction slope vs N", f"{slope(ns, ext_s):.2f}", "1.0 = linear (fixed start-up lowers it)"),
        ("ALF probe s at N = " + "/".join(map(str, ns)), "/".join(f"{s:.1f}" for s in probe_s), "10 epochs"),
        ("ALF probe slope vs N", f"{slope(ns, probe_s):.2f}", "1.0 = linear"),
        ("extraction 24 vs 12 blocks", f"{depth_s[24][0] / depth_s[12][0]:.2f}x", "2x layers"),
        ("ALF probe 24 vs 12 blocks", f"{depth_s[24][1] / depth_s[12][1]:.2f}x", "2x tokens and heads"),
        ("slope vs layers (extraction / probe)",
         f"{math.log(depth_s[24][0] / depth_s[12][0], 2):.2f} / {math.log(depth_s[24][1] / depth_s[12][1], 2):.2f}", ""),
    ], {"N": ns, "extract_s": ext_s, "probe_s": probe_s, "depth": depth_s, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
