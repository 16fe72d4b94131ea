"""The whole lr x wd grid (21 configurations) trained in one pass vs one configuration, same batches and
steps, for the `linear` and `alf` heads. Target: <= 3x."""
import time

import numpy as np
import torch

from common import report
from probes import HEADS, FeatureSet, Protocol
from probes.train import resolve_device, train_configs


def main(n=4096, L=12, D=192, C=10, steps=150, batch=512):
    rng = np.random.default_rng(0)
    y = rng.integers(0, C, n)
    x = rng.standard_normal((n, L, D)).astype(np.float32)
    fs = FeatureSet.from_arrays(cls=x, ap=x[:, ::-1].copy(), labels=y)
    g = Protocol(epochs=1, min_steps=steps, batch_size=batch)
    grid21 = g.configs(with_dropout=False)  # 3 lr x 7 wd
    assert len(grid21) == 21
    device = resolve_device(None)  # CUDA when there is one
    rows, facts = [], {"N": n, "L": L, "D": D, "steps": steps, "batch": batch, "threads": torch.get_num_threads(),
                       "device": str(device)}
    for head in ("linear", "alf"):
        spec = HEADS[head]
        times = {}
        for label, cfgs in (("one", grid21[:1]), ("grid", grid21)):
            t = time.perf_counter()
            train_configs(fs, fs.rows, spec, spec.token_spec(g), cfgs, g, batch_size=batch, seed=0, device=device,
                          progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[label] = time.perf_counter() - t
        facts[head] = times
        rows += [(f"{head}: one config (s)", f"{times['one']:.2f}", f"{steps} steps of {batch} on {device}"),
                 (f"{head}: 21 configs in one pass (s)", f"{times['grid']:.2f}", ""),
                 (f"{head}: grid / one config", f"{times['grid'] / times['one']:.2f}", "target <= 3 (vs 21 if run apart)")]
    report("grid", rows, facts)


if __name__ == "__main__":
    main()
