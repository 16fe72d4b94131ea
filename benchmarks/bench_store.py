"""Store size vs float32 torch .pt files of the same tokens (target <= 0.5), write and read MB/s."""
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import report
from alfcache.backbones import build_random_model
from alfcache.extract import ExtractConfig, extract
from probes import FeatureSet


def du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def main():
    tmp = Path(tempfile.mkdtemp())
    model = build_random_model(tmp / "m", img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3)
    rows, facts = [], {}
    for fmt in ("zarr", "h5"):
        t = time.perf_counter()
        res = extract(ExtractConfig(model=str(model), dataset="digits", splits=["train"], out=tmp / fmt, fmt=fmt,
                                    workers=1, batch_size=128, progress=False))[0]
        facts[f"{fmt}_extract_s"] = time.perf_counter() - t
        fs = FeatureSet.open(res.path)
        t = time.perf_counter()
        cls, ap = np.asarray(fs.cls[:]), np.asarray(fs.ap[:])
        read_s = time.perf_counter() - t
        raw = cls.nbytes + ap.nbytes
        pt = tmp / f"{fmt}.pt"
        t = time.perf_counter()
        torch.save({"cls": torch.from_numpy(cls.astype(np.float32)), "ap": torch.from_numpy(ap.astype(np.float32))}, pt)
        pt_write = time.perf_counter() - t
        # write speed of the store itself, without the model: re-write the same tokens through the sink
        from alfcache.sinks import ZarrSink, H5Sink
        from alfcache.format import read_metadata

        meta = read_metadata(res.path)
        sink_cls = ZarrSink if fmt == "zarr" else H5Sink
        target = tmp / f"rewrite.{fmt}"
        t = time.perf_counter()
        sink = sink_cls(target, {**meta, "complete": False}, create=True)
        for k in range(sink.num_chunks):
            a, b = sink.chunk_range(k)
            sink.write_chunk(k, {"cls": cls[a:b], "ap": ap[a:b]}, fs.labels[a:b], [str(i) for i in range(a, b)], [])
        sink.finalize()
        write_s = time.perf_counter() - t
        size = du(res.path)
        rows += [(f"{fmt}: store / float32 .pt size", f"{size / du(pt):.3f}", "target <= 0.5"),
                 (f"{fmt}: store size (MB)", f"{size / 2**20:.1f}", f"float32 .pt {du(pt) / 2**20:.1f} MB"),
                 (f"{fmt}: write MB/s (raw fp16 tokens)", f"{raw / 2**20 / write_s:.0f}",
                  f"torch.save fp32: {2 * raw / 2**20 / pt_write:.0f}"),
                 (f"{fmt}: read MB/s (whole arrays)", f"{raw / 2**20 / read_s:.0f}", "")]
    report("store", rows, facts)


if __name__ == "__main__":
    main()
