"""Load: extract a 50k-image synthetic folder (small images, tiny model, CPU) while sampling resident memory;
memory must stay flat across batches and the store must verify afterwards."""
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from common import report
from alfcache.backbones import build_random_model
from alfcache.extract import ExtractConfig, extract
from probes.features import verify_store


def main(n=int(sys.argv[1]) if len(sys.argv) > 1 else 50_000):
    from PIL import Image

    tmp = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for i in range(n):
        d = tmp / "imgs" / "train" / f"c{i % 10}"
        if i < 10:
            d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(d / f"{i:06d}.png")
    write_s = time.perf_counter() - t
    model = build_random_model(tmp / "m", img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2)
    proc = psutil.Process()
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((time.perf_counter(), proc.memory_info().rss / 2**20))
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    th.start()
    res = extract(ExtractConfig(model=str(model), dataset=f"imagefolder:{tmp / 'imgs'}", splits=["train"],
                                out=tmp / "f", workers=1, batch_size=256, progress=False))[0]
    stop.set()
    th.join()
    secs = time.perf_counter() - t0
    rss = np.array([r for _, r in samples])
    q = len(rss) // 10
    first, last = rss[q:2 * q].mean(), rss[-2 * q:-q].mean()  # skip start-up and final assembly
    t = time.perf_counter()
    chunks = verify_store(res.path)
    report("load", [
        ("images", f"{n}", f"12 px PNG, written in {write_s:.0f} s"),
        ("extraction (s)", f"{secs:.0f}", f"{n / secs:.0f} img/s, tiny ViT, 1 worker"),
        ("RSS 10-20% through (MB)", f"{first:.0f}", ""),
        ("RSS 80-90% through (MB)", f"{last:.0f}", "steady: no growth across batches"),
        ("RSS growth per 10k images (MB)", f"{(last - first) / (0.7 * n / 1e4):.1f}", "~0"),
        ("peak RSS (MB)", f"{rss.max():.0f}", ""),
        ("store verified", f"{chunks} chunks", f"in {time.perf_counter() - t:.1f} s"),
    ], {"rss_samples": len(rss)})


if __name__ == "__main__":
    main()
