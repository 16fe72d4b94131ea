"""The heads: what each one reads and how its batched module is built.

A head kind is a class (its module, whether it draws dropout masks, whether it has attention weights, how much
activation memory one configuration needs); a head is an instance with a name and a token selection. Adding a
head is one registry line; adding a kind of head is one class here (plus its module in layers.py/attention.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, ClassVar

from .errors import ProbeError, unknown_name
from .selection import TokenLayout, TokenSpec

if TYPE_CHECKING:  # the registry imports no torch: listing heads or checking names stays fast
    import torch
    from torch import nn


@dataclass(frozen=True)
class Head:
    name: str
    tokens: TokenSpec
    kind: ClassVar[str] = ""
    has_attention: ClassVar[bool] = False
    uses_dropout: ClassVar[bool] = False  # its grid has a dropout axis and it draws dropout masks

    def token_spec(self, protocol) -> TokenSpec:
        """The tokens this head reads under a protocol."""
        return self.tokens

    def build(self, G: int, layout: TokenLayout, num_classes: int, dropout: torch.Tensor,
              token_index: torch.Tensor | None = None) -> nn.Module:
        raise NotImplementedError

    def num_heads(self, layout: TokenLayout) -> int:
        return 1

    def draws(self, B: int, layout: TokenLayout, gen: torch.Generator):
        """Random numbers for dropout, drawn once per batch and shared by every configuration (or None)."""
        return None

    def activation_bytes(self, B: int, layout: TokenLayout) -> int:
        """Roughly the training activations of one configuration, for splitting a grid into groups."""
        return B * layout.num_tokens * layout.width * 4 * 2

    def with_tokens(self, layers=None, kinds: str | None = None) -> "Head":
        """The same head on another token selection (fit(..., layers=[3, 7, -1], kinds='ap'))."""
        tokens = replace(self.tokens, layers=tuple(layers) if isinstance(layers, list) else (layers or self.tokens.layers),
                         kinds=kinds or self.tokens.kinds)
        return replace(self, name=f"{self.name}[{tokens.layers}|{tokens.kinds}]", tokens=tokens)

    def describe(self) -> dict:
        return {"class": type(self).__name__, **asdict(self)}


@dataclass(frozen=True)
class LinearProbe(Head):
    """The selected tokens' real columns concatenated -> Linear."""

    kind: ClassVar[str] = "linear"

    def build(self, G, layout, num_classes, dropout, token_index=None):
        import torch

        from .layers import LinearHead

        return LinearHead(G, torch.from_numpy(layout.valid), num_classes)


@dataclass(frozen=True)
class StandardisedLinearProbe(LinearProbe):
    """BatchNorm1d -> Linear on the selected tokens, as the paper's text describes its linear probes (the authors'
    code, and so `linear`, has none: docs/REPRODUCING.md P2). Not one of the paper's heads."""

    kind: ClassVar[str] = "linear-bn"

    def build(self, G, layout, num_classes, dropout, token_index=None):
        import torch

        from .layers import StandardisedLinearHead

        return StandardisedLinearHead(G, torch.from_numpy(layout.valid), num_classes)

    def activation_bytes(self, B, layout):
        return B * len(layout.valid) * 4 * 4


@dataclass(frozen=True)
class PerTokenProbe(Head):
    """One linear probe per token: configuration g reads token `token_index[g]` (per-layer sweeps)."""

    kind: ClassVar[str] = "per-token"

    def build(self, G, layout, num_classes, dropout, token_index=None):
        from .layers import PerTokenLinearHead

        return PerTokenLinearHead(G, layout.widths, layout.width, num_classes, token_index)

    def activation_bytes(self, B, layout):
        return B * layout.width * 4 * 4


@dataclass(frozen=True)
class AttentionProbe(Head):
    """The attention pool over the selected tokens; heads = `heads`, or one per layer token (ALF: 2L)."""

    heads: int | None = None
    kind: ClassVar[str] = "attention"
    has_attention: ClassVar[bool] = True
    uses_dropout: ClassVar[bool] = True

    def num_heads(self, layout):
        if self.heads:
            return self.heads
        return sum(1 for n in layout.names if not n.startswith("patch"))

    def build(self, G, layout, num_classes, dropout, token_index=None):
        H = self.num_heads(layout)
        if layout.width // H < 1:
            raise ProbeError(f"head '{self.name}': width {layout.width} is too narrow for {H} attention heads")
        from .attention import AttentionHead

        return AttentionHead(G, layout.num_tokens, layout.width, num_classes, H, dropout)

    def draws(self, B, layout, gen):
        import torch

        return torch.rand(B, self.num_heads(layout), layout.num_tokens, generator=gen)

    def activation_bytes(self, B, layout):
        H = self.num_heads(layout)
        return B * (H * layout.num_tokens + H * layout.width) * 4 * 4


@dataclass(frozen=True)
class AllTokensProbe(AttentionProbe):
    """The attention pool over every token of the last layer (the paper's "attentive, all tokens" baseline); its
    features are normalised as the protocol says (the authors normalise each channel across the tokens)."""

    kind: ClassVar[str] = "all-tokens"

    def token_spec(self, protocol):
        return replace(self.tokens, normalise=protocol.all_tokens_normalise)


HEAD_KINDS = {cls.__name__: cls for cls in (LinearProbe, StandardisedLinearProbe, PerTokenProbe, AttentionProbe,
                                            AllTokensProbe)}

HEADS: dict[str, Head] = {h.name: h for h in [
    LinearProbe("linear", TokenSpec("last", "cls")),
    LinearProbe("linear-clsap", TokenSpec("last", "cls+ap")),
    StandardisedLinearProbe("linear-bn", TokenSpec("last", "cls")),
    LinearProbe("concat", TokenSpec("all", "cls+ap")),
    LinearProbe("concat:middle+last", TokenSpec("middle+last", "cls+ap")),
    LinearProbe("concat:quarterly", TokenSpec("quarterly", "cls+ap")),
    AllTokensProbe("attentive", TokenSpec("last", "cls", patches=True, pad="widest"), heads=8),
    AttentionProbe("alf", TokenSpec("all", "cls+ap")),
    AttentionProbe("alf:last", TokenSpec("last", "cls+ap")),
    AttentionProbe("alf:middle+last", TokenSpec("middle+last", "cls+ap")),
    AttentionProbe("alf:quarterly", TokenSpec("quarterly", "cls+ap")),
    AttentionProbe("alf-patches", TokenSpec("all", "cls+ap", patches=True)),
]}


def head_spec(name: str) -> Head:
    if name in HEADS:
        return HEADS[name]
    raise unknown_name("head", name, HEADS)


def head_from_dict(d: dict) -> Head:
    """The inverse of Head.describe() (for loading saved probes)."""
    d = dict(d)
    cls = HEAD_KINDS[d.pop("class")]
    tok = dict(d.pop("tokens"))
    if isinstance(tok.get("layers"), list):
        tok["layers"] = tuple(tok["layers"])
    return cls(tokens=TokenSpec(**tok), **d)


def supported_heads(fs) -> list[str]:
    return [n for n, h in HEADS.items() if not h.tokens.patches or fs.patches is not None]


def check_heads(heads: list[str], has_patches: bool | None = None) -> None:
    """Refuse unknown heads, and heads that need patch tokens a store does not have, before any work."""
    if not heads:
        raise ProbeError("no head given (--head needs at least one name, or 'all')")
    for h in heads:
        if h == "all":
            continue
        if h not in HEADS:
            raise unknown_name("head", h, list(HEADS) + ["all"])
        if has_patches is False and HEADS[h].tokens.patches:
            raise ProbeError(f"head '{h}' needs last-layer patch tokens; the store has none (extract with --patches)")
