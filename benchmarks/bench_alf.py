"""One ALF training step (forward, backward, clipping, AdamW) in the factored single-query order (`forward`) against
the textbook order (`forward_direct`: keys and values for every token, as the authors' module computes them), at
the ViT-B and ViT-L shapes, alternated in one run; and the 21-configuration grid (3 lr x 7 wd) in one pass against
21 textbook single-configuration steps. Targets: ViT-B >= 12x, ViT-L >= 14x, grid >= 20x.

Multiply-adds per step (B samples, T tokens, width D, H heads, inner = H * e = 2D, C classes, g configurations):
  factored forward   g * (2 B T D H   [logits; pooling]  + 2 B D inner [values; output projection] + B D C)
  factored backward  the same products again for the weight gradients and about as many for the inputs of the
                     value and output projections; no gradient reaches the (data) tokens:
                     g * (2 B T D H + 4 B D inner + 2 B D C)
  textbook forward   g * (2 B T D inner [keys, values per token] + 2 B T inner [scores, weighted sum]
                          + B inner D + B D C)
  textbook backward  g * (4 B T D inner [weight and input gradients of keys and values]
                          + 4 B T inner + 2 B inner D + 2 B D C)
A step's FLOPs are twice its multiply-adds; GFLOP/s = FLOPs / seconds.
"""
import argparse
import time
from types import SimpleNamespace

import torch

from common import report
from probes.attention import AttentionHead
from probes.heads import HEADS
from probes.loss import weighted_cross_entropy
from probes.optim import BatchedAdamW
from probes.train import _group_size, keep_freed_memory

SHAPES = {"ViT-B": (512, 24, 768, 100), "ViT-L": (256, 48, 1024, 100)}


def macs(kind: str, B: int, T: int, D: int, C: int, g: int = 1) -> float:
    H, inner = T, 2 * D
    if kind == "factored":
        fwd = 2 * B * T * D * H + 2 * B * D * inner + B * D * C
        bwd = 2 * B * T * D * H + 4 * B * D * inner + 2 * B * D * C
    else:
        fwd = 2 * B * T * D * inner + 2 * B * T * inner + B * inner * D + B * D * C
        bwd = 4 * B * T * D * inner + 4 * B * T * inner + 2 * B * inner * D + 2 * B * D * C
    return float(g * (fwd + bwd))


def group_size(G: int, B: int, T: int, D: int) -> int:
    """Configurations per forward/backward, as `train_configs` splits a grid (activations within 1 GB)."""
    layout = SimpleNamespace(num_tokens=T, width=D, names=[f"t{i}" for i in range(T)])
    return _group_size(HEADS["alf"], G, B, layout)


def make_step(G: int, B: int, T: int, D: int, C: int, direct: bool, seed: int = 0, device: str = "cpu"):
    torch.manual_seed(seed)
    head = AttentionHead(G, T, D, C, num_heads=T, dropout=torch.zeros(G)).train().to(device)
    opt = BatchedAdamW(head.parameters(), torch.full((G,), 1e-3, device=device), torch.full((G,), 1e-4, device=device))
    x, y = torch.randn(B, T, D, device=device), torch.randint(0, C, (B,), device=device)
    w = torch.ones(C, device=device)
    fwd = head.forward_direct if direct else head.forward
    lr = torch.full((G,), 1e-3, device=device)

    gs = group_size(G, B, T, D)
    groups = [slice(s, min(G, s + gs)) for s in range(0, G, gs)]

    def step():
        opt.zero_grad()
        for sl in groups:
            with torch.autograd.enforce_grad_layout_policy(False):
                weighted_cross_entropy(fwd(x, sl), y, w).sum().backward()
        opt.gather_grads()
        head.zero_cancelled_grads()
        opt.clip_grad_norm(5.0)
        opt.step(lr)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    keep_freed_memory()
    return step


def timed(step, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t)
    return best


def product_rates(B: int, T: int, D: int, device: str = "cpu") -> list[tuple[str, str, str]]:
    """GFLOP/s of each matrix product of one factored step (one configuration, H = T heads), each timed alone with
    its operands in the layouts `probes/pool.py` uses, against the textbook order's key/value product."""
    keep_freed_memory()  # as training: fresh outputs reuse memory already touched
    H, e = T, 2 * (D // T)
    inner = H * e
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *shape: torch.randn(*shape, device=device, generator=g)  # noqa: E731
    x, u, w, pooled, V, dv, Wo = r(B, T, D), r(H, D), r(B, T, H), r(B, H, D), r(H, D, e), r(B, H, e), r(inner, D)
    dvt, dp = dv.transpose(0, 1), r(H, B, D)
    products = {  # name: (function, multiply-adds)
        "logits (B T, D) x (D, H)": (lambda: torch.mm(x.view(-1, D), u.t()), B * T * D * H),
        "pooling, per sample (H, T) x (T, D)": (lambda: torch.bmm(w.transpose(1, 2), x), B * T * D * H),
        "values, per head (B, D) x (D, e)": (lambda: torch.bmm(pooled.transpose(0, 1), V), B * D * inner),
        "output projection (B, H e) x (H e, D)": (lambda: torch.mm(dv.view(B, inner), Wo), B * D * inner),
        "grad values map, per head (D, B) x (B, e)": (lambda: torch.bmm(pooled.permute(1, 2, 0), dvt), B * D * inner),
        "grad pooled, per head (B, e) x (e, D)": (lambda: torch.bmm(dvt, V.transpose(1, 2)), B * D * inner),
        "grad weights, per sample (T, D) x (D, H)": (lambda: torch.bmm(x, dp.permute(1, 2, 0)), B * T * D * H),
        "grad u (H, B T) x (B T, D)": (lambda: torch.mm(w.view(-1, H).t(), x.view(-1, D)), B * T * D * H),
        "textbook keys/values (B T, D) x (D, H e)": (lambda: torch.mm(x.view(-1, D), Wo.t()), B * T * D * inner),
    }
    rows = []
    for name, (f, mac) in products.items():
        f()
        best = timed(lambda: (f(), torch.cuda.synchronize() if device != "cpu" else None), 5)
        rows.append((f"  {name}", f"{best * 1e3:.1f} ms", f"{2 * mac / best / 1e9:.0f} GFLOP/s"))
    return rows


def main(repeats: int = 3, rounds: int = 3, shapes=("ViT-B", "ViT-L"), grid: bool = True, device: str = "cpu"):
    rows, facts = [], {"threads": torch.get_num_threads(), "repeats": repeats, "rounds": rounds, "device": device}
    for name in shapes:
        B, T, D, C = SHAPES[name]
        steps = {"factored": make_step(1, B, T, D, C, False, device=device),
                 "textbook": make_step(1, B, T, D, C, True, device=device)}
        for s in steps.values():
            s()  # warm-up
        best = {k: float("inf") for k in steps}
        for _ in range(rounds):  # alternate, so a slow spell of the machine hits both
            for k, s in steps.items():
                best[k] = min(best[k], timed(s, repeats))
        ratio = best["textbook"] / best["factored"]
        facts[name] = {"B": B, "T": T, "D": D, "C": C, **{f"{k}_s": v for k, v in best.items()}}
        rows += [(f"{name} B={B} T={T} D={D} C={C}: textbook s/step", f"{best['textbook']:.3f}",
                  f"{2 * macs('textbook', B, T, D, C) / best['textbook'] / 1e9:.0f} GFLOP/s"),
                 (f"{name}: factored s/step", f"{best['factored']:.3f}",
                  f"{2 * macs('factored', B, T, D, C) / best['factored'] / 1e9:.0f} GFLOP/s"),
                 (f"{name}: textbook / factored", f"{ratio:.1f}x",
                  f"target >= {12 if name == 'ViT-B' else 14}x (FLOP ratio "
                  f"{macs('textbook', B, T, D, C) / macs('factored', B, T, D, C):.1f}x)")]
        rows += [(f"{name}: each product alone (warm cache)", "", "")] + product_rates(B, T, D, device)
        if grid and name == "ViT-B":
            g21 = make_step(21, B, T, D, C, False, device=device)
            g21()
            t_grid = min(timed(g21, 1) for _ in range(rounds))
            t21 = 21 * best["textbook"]
            facts["grid21_s"] = t_grid
            rows += [(f"{name}: 21 configs in one pass s/step", f"{t_grid:.3f}",
                      f"{2 * macs('factored', B, T, D, C, 21) / t_grid / 1e9:.0f} GFLOP/s; "
                      f"{t_grid / best['factored']:.1f}x one factored config; groups of {group_size(21, B, T, D)}"),
                     (f"{name}: 21 textbook runs / grid in one pass", f"{t21 / t_grid:.1f}x", "target >= 20x")]
    report("alf_step" if device == "cpu" else f"alf_step_{torch.device(device).type}", rows, facts)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", default="ViT-B,ViT-L")
    ap.add_argument("--no-grid", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (the GPU run: benchmarks/gpu.sh)")
    a = ap.parse_args()
    main(a.repeats, a.rounds, tuple(a.shapes.split(",")), not a.no_grid, a.device)
