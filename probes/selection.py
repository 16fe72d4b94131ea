"""Which tokens a head sees and how they are prepared: layers x kinds interleaved per layer
[CLS_1, AP_1, CLS_2, ...], optionally the last layer's patch tokens; normalised, and zero-padded on the right
where tokens are narrower than the rest (CLIP's projected final layer)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ProbeError

LAYER_SPECS = ("all", "last", "middle+last", "quarterly")
KINDS = ("cls", "ap", "mean", "cls+ap")
# "token": every token L2-normalised on its own; "across-tokens": every channel L2-normalised over the tokens of
# a sample (what the authors' code does to all-token features: F.normalize(dim=1) of an (N, T, D) tensor)
NORMALISE = ("token", "across-tokens", "none")
PAD = ("model", "widest")  # narrower tokens padded to the model's width, or to the widest selected token
FINAL = ("output", "norm")  # the final layer as the model outputs it (CLIP: projected) or the final norm's output


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
    normalise: str = "token"
    pad: str = "model"
    final: str = "output"

    def __post_init__(self):
        for value, known, what in ((self.kinds, KINDS, "token kind"), (self.normalise, NORMALISE, "normalisation"),
                                   (self.pad, PAD, "padding"), (self.final, FINAL, "final-layer form")):
            if value not in known:
                raise ProbeError(f"unknown {what} '{value}' (known: {', '.join(known)})")

    def kind_list(self) -> list[str]:
        return ["cls", "ap"] if self.kinds == "cls+ap" else [self.kinds]

    def token_names(self, layer_names: list[str], num_patches: int = 0) -> list[str]:
        idx = resolve_layers(len(layer_names), self.layers)
        names = [f"{layer_names[i]}:{k}" for i in idx for k in self.kind_list()]
        if self.patches:
            names += [f"patch{p}" for p in range(num_patches)]
        return names


@dataclass(frozen=True)
class TokenLayout:
    """The tokens a head receives: names, each token's real width, the padded width W of the (T, W) array."""

    names: list[str]
    widths: list[int]
    width: int
    valid: np.ndarray = field(repr=False, default=None)  # columns of the flattened (T * W) input that are real

    def __post_init__(self):
        if self.valid is None:
            cols = np.concatenate([t * self.width + np.arange(w) for t, w in enumerate(self.widths)])
            object.__setattr__(self, "valid", cols.astype(np.int64))

    @property
    def num_tokens(self) -> int:
        return len(self.names)

    @property
    def padded(self) -> bool:
        return any(w < self.width for w in self.widths)

    @property
    def features(self) -> int:
        """Width of the concatenation of the real (unpadded) tokens."""
        return int(sum(self.widths))
