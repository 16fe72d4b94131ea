"""Fitting a probe: choose a configuration on a validation split of train, retrain it on all of train; the fitted
probe predicts, scores, exposes its attention weights, and saves / loads itself (safetensors + JSON)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split

from .errors import ProbeError
from .heads import Head, head_from_dict, head_spec
from .layers import count_parameters
from .protocol import Protocol, resolve_protocol
from .ranks import current as current_ranks
from .selection import TokenSpec
from .train import predict_logits, resolve_device, train_configs


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Balanced top-1 accuracy in percent (scikit-learn's definition = the authors': mean recall over the
    classes present in y_true)."""
    return 100.0 * float(balanced_accuracy_score(y_true, y_pred))


def validation_split(y: np.ndarray, fraction: float, seed: int):
    """The authors' split: sklearn's train_test_split of the indices, stratified, random_state = seed."""
    idx = np.arange(len(y))
    _, counts = np.unique(y, return_counts=True)
    strat = y if counts.min() >= 2 else None
    return train_test_split(idx, test_size=fraction, stratify=strat, random_state=seed)


@dataclass
class FittedProbe:
    head: Head
    tokens: TokenSpec
    module: torch.nn.Module
    chosen: dict
    class_names: list[str]
    token_names: list[str]
    record: dict = field(default_factory=dict)
    device: torch.device = torch.device("cpu")

    @property
    def spec(self) -> Head:  # the head (older name)
        return self.head

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.module)

    def __repr__(self) -> str:
        score = self.record.get("val_balanced_accuracy")
        score = f", val {score:.2f}%" if isinstance(score, float) else ""
        chosen = ", ".join(f"{k}={v:g}" for k, v in self.chosen.items() if isinstance(v, (int, float)))
        return (f"FittedProbe({self.head.name}, {len(self.token_names)} tokens, {len(self.class_names)} classes, "
                f"{chosen}{score}, {self.num_parameters:,} params)")

    def logits(self, fs) -> np.ndarray:
        return predict_logits(self.module, fs, fs.rows, self.tokens, self.device)[0][0]

    def predict(self, fs) -> np.ndarray:
        return self.logits(fs).argmax(-1)

    def balanced_accuracy(self, fs) -> float:
        self._check_classes(fs)
        return balanced_accuracy(fs.labels[fs.rows], self.predict(fs))

    def top1(self, fs) -> float:
        return 100.0 * float((self.predict(fs) == fs.labels[fs.rows]).mean())

    def attention(self, fs) -> np.ndarray:
        """(N, H, T) attention weights over the head's tokens (attention heads only)."""
        if not self.head.has_attention:
            raise ProbeError(f"head '{self.head.name}' has no attention weights")
        return predict_logits(self.module, fs, fs.rows, self.tokens, self.device, want_attention=True)[1][0]

    def _check_classes(self, fs) -> None:
        if list(fs.class_names) != list(self.class_names):
            raise ProbeError("the feature set's class names differ from those the probe was trained on")

    def save(self, path: str | Path) -> Path:
        """`<path>.safetensors` (weights) + `<path>.json` (every hyper-parameter and the record), each written
        whole (temporary file + rename)."""
        from safetensors.torch import save

        from alfcache.format import write_atomic

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        write_atomic(path.with_suffix(".safetensors"), save(state))
        cfg = {"head": self.head.describe(), "tokens": self.tokens.__dict__, "chosen": self.chosen,
               "class_names": self.class_names, "token_names": self.token_names, "record": self.record,
               "layout": {"widths": self.record.get("token_widths"), "width": self.record.get("token_width")}}
        write_atomic(path.with_suffix(".json"), json.dumps(cfg, indent=2, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "FittedProbe":
        from safetensors.torch import load_file

        from .selection import TokenLayout

        path = Path(path)
        try:
            cfg = json.loads(path.with_suffix(".json").read_text())
            head = head_from_dict(cfg["head"])
            tok = dict(cfg["tokens"])
            tok["layers"] = tuple(tok["layers"]) if isinstance(tok["layers"], list) else tok["layers"]
            tokens = TokenSpec(**tok)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ProbeError(f"cannot load the probe '{path}': {type(e).__name__}: {e}".splitlines()[0]) from None
        layout = TokenLayout(list(cfg["token_names"]), list(cfg["layout"]["widths"]), int(cfg["layout"]["width"]))
        module = head.build(1, layout, len(cfg["class_names"]), torch.tensor([cfg["chosen"]["dropout"]]))
        module.load_state_dict(load_file(str(path.with_suffix(".safetensors"))))
        module.to(device).eval()
        return cls(head, tokens, module, cfg["chosen"], cfg["class_names"], cfg["token_names"], cfg["record"],
                   torch.device(device))


def fit(train, head: str | Head = "alf", protocol="paper", seed: int = 0, device=None, *,
        layers: str | list[int] | None = None, kinds: str | None = None, progress: bool = True,
        in_memory: bool | None = None, grid=None) -> FittedProbe:
    """Select a configuration on a stratified validation split, retrain it on all of `train`.

    `protocol`: 'paper' (the authors' runs), 'clean', 'quick', a dict of overrides or a Protocol (`grid` is an
    older name for it). `layers` ('all', 'last', 'middle+last', 'quarterly' or indices) and `kinds` ('cls', 'ap',
    'cls+ap', 'mean') override the head's own token selection, e.g. `fit(fs, "alf", layers=[3, 7, -1])`."""
    p: Protocol = resolve_protocol(grid if grid is not None else protocol)
    h = head if isinstance(head, Head) else head_spec(head)
    if layers is not None or kinds is not None:
        h = h.with_tokens(layers, kinds)
    tokens = h.token_spec(p)
    if tokens.patches and train.patches is None:
        raise ProbeError(f"head '{h.name}' needs last-layer patch tokens in the store (extract with --patches)")
    dev = resolve_device(device)
    configs = p.configs(h.uses_dropout)
    rows = train.rows
    if len(rows) < 4:
        raise ProbeError(f"too few training samples ({len(rows)})")
    tr, va = validation_split(train.labels[rows], p.val_fraction, seed)
    batch_all, batch_tune = p.batch_size_for(len(rows)), p.tuning_batch_size(len(rows), len(tr))
    ranks = current_ranks()  # under torchrun each rank trains every world-th configuration
    mine = ranks.share_of(len(configs))
    t0 = time.perf_counter()
    part: dict[int, float] = {}
    if mine:
        desc = f"{h.name}: grid of {len(configs)}" + (f" [rank {ranks.rank}/{ranks.world}: {len(mine)}]" if ranks.on else "")
        grid_module, _ = train_configs(train, rows[tr], h, tokens, [configs[i] for i in mine], p,
                                       batch_size=batch_tune, seed=seed, device=dev, progress=progress, desc=desc,
                                       in_memory=in_memory)
        val_logits, _ = predict_logits(grid_module, train, rows[va], tokens, dev,
                                       noise=(p, seed) if p.val_noise else None)
        y_val = train.labels[rows[va]]
        part = {i: balanced_accuracy(y_val, val_logits[j].argmax(-1)) for j, i in enumerate(mine)}
    grid_secs = time.perf_counter() - t0
    gathered = ranks.gather(part)
    scores = [gathered[i] for i in range(len(configs))]
    best = int(np.argmax(scores))  # the first best, in the authors' order (dropout, lr, weight decay)
    chosen = configs[best]
    t1 = time.perf_counter()
    final, final_steps = train_configs(train, rows, h, tokens, [chosen], p, batch_size=batch_all, seed=seed,
                                       device=dev, progress=progress, desc=f"{h.name}: retrain best",
                                       in_memory=in_memory)
    retrain_secs = time.perf_counter() - t1
    layout = train.layout(tokens)
    record = {
        "head": h.name, "protocol": p.describe(), "seed": seed, "device": str(dev),
        "chosen": chosen, "val_balanced_accuracy": scores[best], "validation_noise": p.val_noise,
        "grid_results": [{**c, "val_balanced_accuracy": s} for c, s in zip(configs, scores)],
        "n_train": int(len(tr)), "n_val": int(len(va)), "n_train_all": int(len(rows)),
        "batch_size_grid": batch_tune, "steps_grid": p.steps(len(tr), batch_tune),
        "epochs_grid": p.epochs_for(len(tr), batch_tune),
        "batch_size": batch_all, "steps_final": final_steps, "epochs_final": p.epochs_for(len(rows), batch_all),
        "train_seconds_grid": grid_secs, "train_seconds_final": retrain_secs, "ranks": ranks.world,
        "params": count_parameters(final), "tokens": tokens.__dict__, "token_widths": layout.widths,
        "token_width": layout.width, "num_heads": h.num_heads(layout) if h.has_attention else None,
    }
    return FittedProbe(h, tokens, final, chosen, list(train.class_names), train.token_names(tokens), record, dev)
