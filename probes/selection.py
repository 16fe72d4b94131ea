"""Which tokens a head sees: layers x kinds, interleaved per layer, L2-normalised per token."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ProbeError

LAYER_SPECS = ("all", "last", "middle+last", "quarterly")
KINDS = ("cls", "ap", "mean", "cls+ap")


def resolve_layers(num_layers: int, spec: str | list[int] | tuple[int, ...]) -> list[int]:
    """'all' | 'last' | 'middle+last' | 'quarterly' | explicit indices (negatives count from the end).

    For 12 layers: middle+last = [5, 11] (layers 6 and 12), quarterly = [2, 5, 8, 11] (3/6/9/12).
    """
    L = num_layers
    if isinstance(spec, str):
        if spec == "all":
            return list(range(L))
        if spec == "last":
            return [L - 1]
        if spec == "middle+last":
            return sorted({max(0, L // 2 - 1), L - 1})
        if spec == "quarterly":
            return sorted({max(0, round(L * q / 4) - 1) for q in (1, 2, 3, 4)})
        try:
            spec = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise ProbeError(f"unknown layer selection '{spec}' (known: {', '.join(LAYER_SPECS)}, or indices like 3,7,-1)") from None
    out = []
    for i in spec:
        j = i + L if i < 0 else i
        if not 0 <= j < L:
            raise ProbeError(f"layer index {i} out of range for {L} layers")
        out.append(j)
    if not out:
        raise ProbeError("empty layer selection")
    return sorted(dict.fromkeys(out))


@dataclass(frozen=True)
class TokenSpec:
    layers: str | tuple[int, ...] = "all"
    kinds: str = "cls+ap"  # cls | ap | mean (all tokens; module taps) | cls+ap
    patches: bool = False  # append the last layer's patch tokens (needs `patches` in the feature set)
    normalise: bool = True

    def __post_init__(self):
        if self.kinds not in KINDS:
            raise ProbeError(f"unknown token kind '{self.kinds}' (known: {', '.join(KINDS)})")

    def kind_list(self) -> list[str]:
        return ["cls", "ap"] if self.kinds == "cls+ap" else [self.kinds]

    def token_names(self, layer_names: list[str], num_patches: int = 0) -> list[str]:
        idx = resolve_layers(len(layer_names), self.layers)
        names = [f"{layer_names[i]}:{k}" for i in idx for k in self.kind_list()]
        if self.patches:
            names += [f"patch{p}" for p in range(num_patches)]
        return names
