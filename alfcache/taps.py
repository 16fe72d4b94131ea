"""Tap points: named modules whose outputs are pooled to CLS and AP tokens in one forward pass.

Tap sets
- `alf` (paper default): `blocks.i.norm2` for blocks 1..n-1 (LayerNorm2 applied to x + MHSA(x)),
  then the final `norm`  -> L = n layers.
- `blocks`: the residual output of every block 0..n-1, then the final `norm` -> L = n + 1.
- an explicit comma-separated list of module names (all of one width).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import AlfError, unknown_name

TAP_SETS = ("alf", "blocks")


@dataclass(frozen=True)
class TapPlan:
    tap_set: str
    modules: list[str]  # module names in the model, in layer order
    layer_names: list[str]  # short human names, e.g. "block1.norm2", "final_norm"


def resolve_taps(model: torch.nn.Module, spec: str = "alf") -> TapPlan:
    depth = len(model.blocks)
    if spec == "alf":
        mods = [f"blocks.{i}.norm2" for i in range(1, depth)] + ["norm"]
        names = [f"block{i}.norm2" for i in range(1, depth)] + ["final_norm"]
    elif spec == "blocks":
        mods = [f"blocks.{i}" for i in range(depth)] + ["norm"]
        names = [f"block{i}" for i in range(depth)] + ["final_norm"]
    else:
        mods = [m.strip() for m in spec.split(",") if m.strip()]
        names = list(mods)
        if not mods:
            raise unknown_name("tap set", spec, TAP_SETS, hint="or a comma-separated list of module names")
    known = dict(model.named_modules())
    for m in mods:
        if m not in known:
            if "," not in spec and spec not in TAP_SETS and len(mods) == 1:
                raise unknown_name("tap set", spec, TAP_SETS, hint="or a comma-separated list of module names")
            raise unknown_name("tap module", m, [k for k in known if k.count(".") <= 2][:40])
    return TapPlan(spec, mods, names)


class TapCollector:
    """Forward hooks that pool each tapped module's output into CLS and AP, in float32.

    Only the pooled (B, D) vectors are kept per layer; the full token tensor is never copied.
    AP averages the patch tokens only: it skips the `num_prefix` leading tokens (CLS and registers).
    """

    def __init__(self, model: torch.nn.Module, plan: TapPlan, num_prefix: int):
        self.model, self.plan, self.num_prefix = model, plan, num_prefix
        self._cls: list[torch.Tensor | None] = [None] * len(plan.modules)
        self._ap: list[torch.Tensor | None] = [None] * len(plan.modules)
        self._width: int | None = None

    def _hook(self, idx: int):
        def fn(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if out.dim() != 3:
                raise AlfError(f"tap '{self.plan.modules[idx]}' gave shape {tuple(out.shape)}, expected (B, T, D)")
            self._cls[idx] = out[:, 0].float()
            self._ap[idx] = out[:, self.num_prefix:].float().mean(dim=1)
        return fn

    @contextmanager
    def attached(self):
        modules = dict(self.model.named_modules())
        handles = [modules[m].register_forward_hook(self._hook(i)) for i, m in enumerate(self.plan.modules)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def collect(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cls, ap), each (B, L, D) float32, for the last forward pass."""
        if any(t is None for t in self._cls):
            missing = [m for m, t in zip(self.plan.modules, self._cls) if t is None]
            raise AlfError(f"taps did not fire during the forward pass: {', '.join(missing)}")
        widths = {t.shape[-1] for t in self._cls}
        if len(widths) != 1:
            raise AlfError(f"tapped modules have different widths {sorted(widths)}; tap one width per store")
        cls, ap = torch.stack(self._cls, dim=1), torch.stack(self._ap, dim=1)
        self._cls = [None] * len(self._cls)
        self._ap = [None] * len(self._ap)
        return cls, ap
