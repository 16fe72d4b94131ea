"""Memory-mapped (chunk-streamed) random-batch reading vs the same arrays in RAM (target >= 0.5), and peak
resident memory while probing a store larger than the RAM budget given to the trainer."""
import tempfile
import time
from pathlib import Path

import numpy as np

from common import report, rss_mb
from alfcache.sinks import ZarrSink
from probes import FeatureSet, TokenSpec
from probes.batches import BatchStream


def make_store(path: Path, n=16384, L=12, D=512, rows=512) -> int:
    meta = {"format": "alfcache-store", "format_version": 1, "num_samples": n, "num_layers": L, "width": D,
            "dtype": "float16", "chunk_rows": rows, "class_names": [str(c) for c in range(10)], "complete": False,
            "arrays": {k: {"shape": [n, L, D], "dtype": "float16"} for k in ("cls", "ap")},
            "taps": {"layer_names": [f"l{i}" for i in range(L)], "modules": []}}
    sink = ZarrSink(path, meta, create=True)
    rng = np.random.default_rng(0)
    for k in range(n // rows):
        y = rng.integers(0, 10, rows)
        blk = rng.standard_normal((rows, L, D), dtype=np.float32)
        blk[:, -1, :10] += 3 * np.eye(10)[y]
        blk = blk.astype(np.float16)
        sink.write_chunk(k, {"cls": blk, "ap": blk}, y.astype(np.int64), [str(i) for i in range(rows)], [])
    sink.finalize()
    return 2 * n * L * D * 2


CHILD = """
import sys, threading, time, psutil
sys.path.insert(0, {root!r})
proc, peak = psutil.Process(), [0]
def sample():
    while True:
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
from probes import FeatureSet, Protocol, fit
fs = FeatureSet.open({store!r})
base = proc.memory_info().rss / 2**20
t = time.perf_counter()
p = fit(fs, {head!r}, protocol=Protocol(val_noise=False, lr=(1e-2,), wd=(1e-4,), dropout=(0.0,), epochs=1, min_steps=30, batch_size=1024),
        progress=False, in_memory={in_memory})
print(base, peak[0] / 2**20, time.perf_counter() - t, p.record['val_balanced_accuracy'])
"""


def main():
    tmp = Path(tempfile.mkdtemp())
    size = make_store(tmp / "big.zarr")
    spec = TokenSpec("all", "cls+ap")
    rows, facts = [], {}
    fs = FeatureSet.open(tmp / "big.zarr")
    base = rss_mb()
    stream = iter(BatchStream(fs, fs.rows, spec, 1024, seed=0, in_memory=False))
    t = time.perf_counter()
    for _ in range(32):
        next(stream)
    mm_s = time.perf_counter() - t
    mm_rss = rss_mb() - base
    ram = FeatureSet.open(tmp / "big.zarr", in_memory=True)
    mem = iter(BatchStream(ram, ram.rows, spec, 1024, seed=0, in_memory=True))
    t = time.perf_counter()
    for _ in range(32):
        next(mem)
    ram_s = time.perf_counter() - t
    rows += [("store size (MB, float16 cls+ap)", f"{size / 2**20:.0f}", "16384 x 12 layers x 512"),
             ("streamed batches/s (1024 x 24 tokens)", f"{32 / mm_s:.1f}", "chunk-shuffled reads from the store"),
             ("in-RAM batches/s", f"{32 / ram_s:.1f}", ""),
             ("streamed / in-RAM", f"{ram_s / mm_s:.2f}", "target >= 0.5"),
             ("RSS growth while streaming (MB)", f"{mm_rss:.0f}", f"store is {size / 2**20:.0f} MB")]
    del ram, mem
    # probing a store larger than the RAM the trainer may use: a clean child process streams it, and the same
    # fit in RAM for the end-to-end ratio (ru_maxrss survives execve and would report the forked parent's
    # peak: sample RSS in the child instead)
    import subprocess
    import sys

    runs = {}
    for head in ("linear-clsap", "alf"):
        for in_memory in (False, True):
            code = CHILD.format(root=str(Path(__file__).resolve().parents[1]), store=str(tmp / "big.zarr"),
                                head=head, in_memory=in_memory)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
            runs[head, in_memory] = dict(zip(("base", "peak", "secs", "val"), map(float, out[-4:])))
    for head in ("linear-clsap", "alf"):
        st, ram = runs[head, False], runs[head, True]
        rows += [(f"{head} probe, streamed: peak RSS growth over the open store (MB)", f"{st['peak'] - st['base']:.0f}",
                  f"in RAM: {ram['peak'] - ram['base']:.0f}; store {size / 2**20:.0f} MB"),
                 (f"{head} probe: time streamed / in RAM (s)", f"{st['secs']:.1f} / {ram['secs']:.1f}",
                  f"val balanced acc {st['val']:.1f} / {ram['val']:.1f}"),
                 (f"{head} probe: in-RAM speed / streamed speed", f"{ram['secs'] / st['secs']:.2f}", "target >= 0.5")]
    facts["probe_runs"] = {f"{h}|{'ram' if m else 'streamed'}": v for (h, m), v in runs.items()}
    report("mmap", rows, facts)


if __name__ == "__main__":
    main()
