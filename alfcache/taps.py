"""Tap points: named modules whose outputs (or inputs) are pooled into tokens in one forward pass.

Every plan has a *main* group, stored as `cls` / `ap` (N, L, D):
- `alf` (paper default): `norm2` (LayerNorm2 applied to x + MHSA(x)) of blocks 1..n-1, then the final norm
  -> L = n layers.
- `blocks`: the residual output of every block 0..n-1, then the final norm -> L = n + 1.
- `modules`: the `alf` main group plus the module study's (Odonnat et al.) eight taps in every block,
  each kind in its own arrays `modules/<kind>/{cls,ap,mean}` (N, n, width of that module):
  attn_norm (norm1 out), attn (MHSA out), attn_res (x + attn: norm2's input), ffn_norm (norm2 out),
  ffn_fc1, ffn_activation (4D wide), ffn_fc2, ffn_res (block out).
- an explicit comma-separated list of module names (one width) as the main group.
Optional extras: the last main layer's patch tokens (`patches`, N x P x D) and the register tokens of every
main layer (`registers`, N x L x R x D).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .errors import AlfError, unknown_name

TAP_SETS = ("alf", "blocks", "modules")
MODULE_KINDS = ("attn_norm", "attn", "attn_res", "ffn_norm", "ffn_fc1", "ffn_activation", "ffn_fc2", "ffn_res")


@dataclass(frozen=True)
class Tap:
    module: str  # name in model.named_modules()
    group: str  # "main" or a module kind
    index: int  # layer index inside its group
    use_input: bool = False  # pool the module's input (attn_res = norm2's input) instead of its output
    post: Callable | None = None  # applied to the tensor before pooling (e.g. CLIP's post-norm on all tokens)


@dataclass
class TapPlan:
    tap_set: str
    taps: list[Tap]
    layer_names: list[str]  # main group, human names
    module_kinds: list[str] = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return [t.module for t in self.taps if t.group == "main"]

    def describe(self) -> dict:
        d = {"tap_set": self.tap_set, "modules": self.modules, "layer_names": self.layer_names, **self.notes}
        if self.module_kinds:
            d["module_taps"] = {k: [t.module + (":input" if t.use_input else "") for t in self.taps if t.group == k]
                                for k in self.module_kinds}
        return d


@dataclass(frozen=True)
class Layout:
    """Where a backbone keeps its blocks and norms (timm and transformers differ)."""

    blocks: str  # e.g. "blocks" or "encoder.layer"
    norm1: str
    attn: str
    norm2: str
    fc1: str
    act: str
    fc2: str
    final: str  # final norm module name
    final_on: str | None = None  # module whose output the final norm is applied to (when the model itself
    # applies it to the CLS token only, e.g. transformers' CLIP post_layernorm)


TIMM_LAYOUT = Layout("blocks", "norm1", "attn", "norm2", "mlp.fc1", "mlp.act", "mlp.fc2", "norm")


def _final_tap(model: torch.nn.Module, layout: Layout, index: int) -> Tap:
    if layout.final_on is None:
        return Tap(layout.final, "main", index)
    norm = dict(model.named_modules())[layout.final]
    return Tap(layout.final_on, "main", index, post=norm)


def resolve_taps(model: torch.nn.Module, spec: str = "alf", layout: Layout = TIMM_LAYOUT) -> TapPlan:
    depth = len(dict(model.named_modules())[layout.blocks])
    b = lambda i, sub="": f"{layout.blocks}.{i}" + (f".{sub}" if sub else "")
    notes = {"final_norm": layout.final + (f" applied to the output of {layout.final_on}" if layout.final_on else "")}
    if spec in ("alf", "modules"):
        taps = [Tap(b(i, layout.norm2), "main", i - 1) for i in range(1, depth)] + [_final_tap(model, layout, depth - 1)]
        names = [f"block{i}.norm2" for i in range(1, depth)] + ["final_norm"]
    elif spec == "blocks":
        taps = [Tap(b(i), "main", i) for i in range(depth)] + [_final_tap(model, layout, depth)]
        names = [f"block{i}" for i in range(depth)] + ["final_norm"]
    else:
        mods = [m.strip() for m in spec.split(",") if m.strip()]
        if not mods:
            raise unknown_name("tap set", spec, TAP_SETS, hint="or a comma-separated list of module names")
        taps = [Tap(m, "main", i) for i, m in enumerate(mods)]
        names = list(mods)
    kinds: list[str] = []
    if spec == "modules":
        kinds = list(MODULE_KINDS)
        where = {"attn_norm": (layout.norm1, False), "attn": (layout.attn, False), "attn_res": (layout.norm2, True),
                 "ffn_norm": (layout.norm2, False), "ffn_fc1": (layout.fc1, False), "ffn_activation": (layout.act, False),
                 "ffn_fc2": (layout.fc2, False), "ffn_res": ("", False)}
        for k in kinds:
            sub, use_input = where[k]
            taps += [Tap(b(i, sub), k, i, use_input) for i in range(depth)]
    known = dict(model.named_modules())
    for t in taps:
        if t.module not in known:
            if spec not in TAP_SETS and "," not in spec:
                raise unknown_name("tap set", spec, TAP_SETS, hint="or a comma-separated list of module names")
            raise unknown_name("tap module", t.module, [k for k in known if k.count(".") <= 2][:40])
    return TapPlan(spec, taps, names, kinds, notes)


class TapCollector:
    """Forward hooks that pool each tapped tensor in float32 as soon as it is produced.

    Main group: CLS (token 0) and AP (mean of the patch tokens, skipping the `num_prefix` CLS + register
    tokens). Module groups add `mean` (all tokens). Only pooled vectors are kept; with `patches` the last
    main layer's patch tokens and with `registers` every main layer's register tokens are kept too.
    """

    def __init__(self, model: torch.nn.Module, plan: TapPlan, num_prefix: int, *, patches: bool = False,
                 num_registers: int = 0):
        self.model, self.plan, self.num_prefix = model, plan, num_prefix
        self.patches, self.num_registers = patches, num_registers
        self._out: dict[tuple[str, str, int], torch.Tensor] = {}
        self._last_main = max(t.index for t in plan.taps if t.group == "main")

    def _pool(self, tap: Tap, x):
        x = x[0] if isinstance(x, (tuple, list)) else x
        x = getattr(x, "last_hidden_state", x)
        if tap.post is not None:
            x = tap.post(x)
        if not torch.is_tensor(x) or x.dim() != 3:
            raise AlfError(f"tap '{tap.module}' gave {getattr(x, 'shape', type(x))}, expected (B, T, D) tokens")
        g, i = tap.group, tap.index
        self._out[(g, "cls", i)] = x[:, 0].float()
        self._out[(g, "ap", i)] = x[:, self.num_prefix:].float().mean(dim=1)
        if g != "main":
            self._out[(g, "mean", i)] = x.float().mean(dim=1)
        else:
            if self.num_registers:
                self._out[(g, "registers", i)] = x[:, self.num_prefix - self.num_registers:self.num_prefix].float()
            if self.patches and i == self._last_main:
                self._out[(g, "patches", i)] = x[:, self.num_prefix:].float()

    def _hook(self, tap: Tap):
        if tap.use_input:
            return lambda module, args: self._pool(tap, args[0])
        return lambda module, args, output: self._pool(tap, output)

    @contextmanager
    def attached(self):
        modules = dict(self.model.named_modules())
        handles = []
        try:
            for t in self.plan.taps:
                m = modules[t.module]
                handles.append(m.register_forward_pre_hook(self._hook(t)) if t.use_input
                               else m.register_forward_hook(self._hook(t)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def collect(self) -> dict[str, torch.Tensor]:
        """Arrays of the last forward pass: `cls`, `ap` (B, L, D), `modules/<kind>/<pool>` (B, n, Dm),
        `patches` (B, P, D), `registers` (B, L, R, D)."""
        out: dict[str, torch.Tensor] = {}
        missing = [t.module for t in self.plan.taps if (t.group, "cls", t.index) not in self._out]
        if missing:
            raise AlfError(f"taps did not fire during the forward pass: {', '.join(missing[:5])}")
        groups = ["main"] + self.plan.module_kinds
        for g in groups:
            n = 1 + max(t.index for t in self.plan.taps if t.group == g)
            pools = ("cls", "ap") if g == "main" else ("cls", "ap", "mean")
            for p in pools:
                parts = [self._out[(g, p, i)] for i in range(n)]
                widths = {t.shape[-1] for t in parts}
                if len(widths) != 1:
                    raise AlfError(f"tapped modules of group '{g}' have different widths {sorted(widths)}")
                out[p if g == "main" else f"modules/{g}/{p}"] = torch.stack(parts, dim=1)
        if self.num_registers:
            out["registers"] = torch.stack([self._out[("main", "registers", i)] for i in range(self._last_main + 1)], 1)
        if self.patches:
            out["patches"] = self._out[("main", "patches", self._last_main)]
        self._out = {}
        return out
