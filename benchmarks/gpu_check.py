"""GPU agreement check (run by gpu.sh): the lr x wd grid trained in one pass on CUDA gives, configuration by
configuration, the logits of the same configuration trained alone on CUDA, and of the grid trained on the CPU
(same batches, same draws). Prints the largest differences; exits non-zero when one is over its tolerance."""
import sys

import numpy as np
import torch

from common import report  # noqa: F401  (puts the repository on sys.path)
from probes import HEADS, FeatureSet, Protocol
from probes.train import predict_logits, train_configs


def main(n=1024, L=6, D=64, C=5, steps=40, batch=128) -> int:
    rng = np.random.default_rng(0)
    y = rng.integers(0, C, n)
    x = rng.standard_normal((n, L, D)).astype(np.float32)
    x[np.arange(n), :, y] += 1.0  # a learnable signal
    fs = FeatureSet.from_arrays(cls=x, ap=x[:, ::-1].copy(), labels=y)
    g = Protocol(epochs=1, min_steps=steps, batch_size=batch)
    # lr 0.1 is left out: at that rate ALF training is chaotic, and one rounding difference (the CPU's BLAS rounds
    # by the alignment of a configuration's slice) grows into different logits, on any device
    grid = [c for c in g.configs(with_dropout=False) if c["lr"] <= 1e-2][::2][:6]
    cuda = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # (a CPU-only run checks the script itself)
    cpu = torch.device("cpu")
    worst = 0.0
    for head in ("linear", "alf"):
        spec = HEADS[head]
        tokens = spec.token_spec(g)

        def logits(cfgs, device):
            m, _ = train_configs(fs, fs.rows, spec, tokens, cfgs, g, batch_size=batch, seed=0, device=device,
                                 progress=False)
            return torch.as_tensor(np.asarray(predict_logits(m, fs, fs.rows, tokens, device)[0], dtype=np.float32))

        on_gpu, on_cpu = logits(grid, cuda), logits(grid, cpu)
        alone = torch.cat([logits([c], cuda) for c in grid[:3]])
        scale = on_cpu.abs().max().item()
        d_alone = (on_gpu[:3] - alone).abs().max().item() / scale
        d_cpu = (on_gpu - on_cpu).abs().max().item() / scale
        acc = (on_gpu.argmax(-1) == torch.from_numpy(y)).float().mean(1)
        print(f"{head}: grid vs alone on cuda {d_alone:.2e}, cuda vs cpu {d_cpu:.2e} (relative to max |logit| "
              f"{scale:.2f}); train accuracy per config {[round(a, 3) for a in acc.tolist()]}")
        same = (on_gpu.argmax(-1) == on_cpu.argmax(-1)).float().mean().item()
        print(f"{head}: predictions the same on cuda and cpu: {same:.4f}")
        worst = max(worst, d_alone, d_cpu)
    print(f"largest relative difference {worst:.2e} (tolerance 1e-2; float32 weights, TF32 as torch's default)")
    return 0 if worst < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
