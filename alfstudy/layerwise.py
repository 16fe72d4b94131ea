"""Per-layer linear probes (CLS and AP of every tapped layer) and CKA of each layer with the last.

All 2L per-token probes x the lr/wd grid train in one pass with the same batched trainer as the heads:
a configuration here is (token, lr, wd); each reads its own token.
"""
from __future__ import annotations

import numpy as np

from .cka import cka
from probes.features import FeatureSet
from probes.fitting import balanced_accuracy, validation_split
from probes.heads import PerTokenProbe
from probes.protocol import resolve_protocol
from probes.selection import TokenSpec
from probes.train import predict_logits, resolve_device, train_configs



def _sweep_once(train: FeatureSet, test: FeatureSet, head: PerTokenProbe, tokens: TokenSpec, p, seed: int, dev,
                progress: bool) -> tuple[list[dict], list[float], list[float]]:
    """Every token's linear probe x the lr/wd grid in one pass; each token's best retrained; test scores."""
    T = len(train.token_names(tokens))
    rows = train.rows
    tr, va = validation_split(train.labels[rows], p.val_fraction, seed)
    batch_all, batch_tune = p.batch_size_for(len(rows)), p.tuning_batch_size(len(rows), len(tr))
    configs = [{"token": t, "lr": c["lr"], "wd": c["wd"], "dropout": 0.0} for t in range(T) for c in p.configs(False)]
    module, _ = train_configs(train, rows[tr], head, tokens, configs, p, batch_size=batch_tune, seed=seed,
                              device=dev, progress=progress, desc=f"layer sweep (seed {seed}): {len(configs)} probes")
    val_logits, _ = predict_logits(module, train, rows[va], tokens, dev, noise=(p, seed) if p.val_noise else None)
    y_val = train.labels[rows[va]]
    scores = np.array([balanced_accuracy(y_val, val_logits[i].argmax(-1)) for i in range(len(configs))])
    best = [max((i for i in range(len(configs)) if configs[i]["token"] == t), key=lambda i: scores[i]) for t in range(T)]
    winners = [configs[i] for i in best]
    final, _ = train_configs(train, rows, head, tokens, winners, p, batch_size=batch_all, seed=seed, device=dev,
                             progress=progress, desc=f"layer sweep (seed {seed}): retrain winners")
    test_logits, _ = predict_logits(final, test, test.rows, tokens, dev)
    y_test = test.labels[test.rows]
    return (winners, [float(scores[i]) for i in best],
            [balanced_accuracy(y_test, test_logits[t].argmax(-1)) for t in range(T)])


def layer_sweep(train: FeatureSet, test: FeatureSet, protocol="quick", seed: int = 0, device=None,
                kernel: str = "linear", progress: bool = True, kinds: str = "cls+ap", seeds: int = 1) -> list[dict]:
    """One row per (layer, kind): test balanced accuracy of its linear probe (mean and standard deviation over
    `seeds` seeds; lr/wd chosen per seed, the first seed's shown), and CKA of the layer with the last.
    Each token's probe is the authors' per-layer linear probe (single_model_evaluation_all_intermediate_layers)."""
    p = resolve_protocol(protocol)
    dev = resolve_device(device)
    head = PerTokenProbe("per-token", TokenSpec("all", kinds))
    tokens = head.token_spec(p)
    per_layer = len(tokens.kind_list())
    names = train.token_names(tokens)
    T = len(names)
    runs = [_sweep_once(train, test, head, tokens, p, s, dev, progress) for s in range(seed, seed + seeds)]
    widths = test.layout(tokens).widths
    raw = test.tokens(test.rows, TokenSpec("all", kinds, normalise="none"))
    present = len(np.unique(test.labels[test.rows]))
    out = []
    for t, name in enumerate(names):
        layer, kind = name.rsplit(":", 1)
        last = T - per_layer + t % per_layer
        test_accs = [r[2][t] for r in runs]
        out.append({"token": name, "layer": layer, "layer_index": t // per_layer + 1, "kind": kind,
                    "lr": runs[0][0][t]["lr"], "wd": runs[0][0][t]["wd"],
                    "val_balanced_accuracy": float(np.mean([r[1][t] for r in runs])),
                    "test_balanced_accuracy": float(np.mean(test_accs)),
                    "test_balanced_accuracy_std": float(np.std(test_accs, ddof=1)) if len(runs) > 1 else 0.0,
                    "n_seeds": len(runs), "chance": 100.0 / present,
                    f"cka_{kernel}_with_last": cka(raw[:, t, :widths[t]], raw[:, last, :widths[last]], kernel=kernel)})
    return out


def module_sweep(train: FeatureSet, test: FeatureSet, pool: str = "mean", protocol="quick", seed: int = 0,
                 device=None, progress: bool = True, seeds: int = 1) -> list[dict]:
    """Linear probe on every (block, module) of a `--taps modules` store (Odonnat et al.'s picture):
    one row per block with the test balanced accuracy of each module and the best module."""
    kinds = train.module_taps
    if not kinds:
        from probes.errors import ProbeError

        raise ProbeError("the store has no module taps; extract with --taps modules")
    per_module = {k: layer_sweep(train.select_tap(k), test.select_tap(k), protocol=protocol, seed=seed,
                                 device=device, progress=progress, kinds=pool, seeds=seeds) for k in kinds}
    rows = []
    for b in range(len(per_module[kinds[0]])):
        row = {"block": b, **{k: round(per_module[k][b]["test_balanced_accuracy"], 2) for k in kinds}}
        row["best_module"] = max(kinds, key=lambda k: row[k])
        rows.append(row)
    return rows
