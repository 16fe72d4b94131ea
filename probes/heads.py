"""Probe heads, batched over a grid: every parameter has a leading axis G (one slice per configuration).

A head is a pool followed by the shared classifier `BatchNorm1d -> Linear`:
- `LinearHead`: no pool; the selected tokens are concatenated (linear, linear-clsap, concat).
- `AttentionPoolHead`: the paper's attention pool (ALF, attentive): one learned query (init N(0, .02)),
  separate LayerNorms on query/key/value inputs, bias-free q/k/v maps, per-head dim 2 * (D // heads),
  softmax(q k^T / sqrt(head_dim)), attention and projection dropout, output projection; no residual,
  no MLP. `forward` uses the exact single-query factorisation (reference section 8); `forward_direct`
  computes keys and values for every token, for checking.

All G slices start from the same initialisation (drawn once from the seed), so a configuration trained
inside a grid equals the same configuration trained alone.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _replicate(t: torch.Tensor, G: int) -> nn.Parameter:
    return nn.Parameter(t.unsqueeze(0).repeat(G, *([1] * t.dim())).contiguous())


def _linear_init(fan_in: int, fan_out: int, bias: bool = True):
    """torch.nn.Linear's default initialisation, as (in, out) weight and (out,) bias."""
    lin = nn.Linear(fan_in, fan_out, bias=bias)
    return lin.weight.detach().t().contiguous(), (lin.bias.detach().clone() if bias else None)


def _biased_var(x: torch.Tensor, mean: torch.Tensor, dim: int) -> torch.Tensor:
    """Population variance by the two-pass formula: equals x.var(dim, unbiased=False), whose CPU kernel is
    ~5x slower when reducing over the leading (batch) axis."""
    d = x - mean.unsqueeze(dim)
    return (d * d).mean(dim)


class BatchedBatchNorm(nn.Module):
    """BatchNorm1d (affine, momentum 0.1) applied independently per configuration: x (G, B, F)."""

    def __init__(self, G: int, features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(G, features))
        self.bias = nn.Parameter(torch.zeros(G, features))
        self.register_buffer("running_mean", torch.zeros(G, features))
        self.register_buffer("running_var", torch.ones(G, features))

    @torch.no_grad()
    def track(self, sl: slice, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """Move the running statistics of configurations `sl` towards a batch's (BatchNorm1d's momentum rule);
        mean / unbiased_var: (g, F), or (F,) when every configuration saw the same batch."""
        self.running_mean[sl].lerp_(mean, self.momentum)
        self.running_var[sl].lerp_(unbiased_var, self.momentum)

    def forward(self, x: torch.Tensor, sl: slice = slice(None)) -> torch.Tensor:
        if self.training:
            mean = x.mean(dim=1)
            var = _biased_var(x, mean, 1)
            n = x.shape[1]
            self.track(sl, mean, var * (n / max(n - 1, 1)))
        else:
            mean, var = self.running_mean[sl], self.running_var[sl]
        xn = (x - mean.unsqueeze(1)) * torch.rsqrt(var.unsqueeze(1) + self.eps)
        return xn * self.weight[sl].unsqueeze(1) + self.bias[sl].unsqueeze(1)


class Classifier(nn.Module):
    """BatchNorm1d -> Linear, batched over G. Logits (G, B, C) are laid out class-major in memory (a transposed
    view of (G, C, B)), so the loss's reductions over the few classes run along long rows."""

    def __init__(self, G: int, features: int, num_classes: int):
        super().__init__()
        self.bn = BatchedBatchNorm(G, features)
        w, b = _linear_init(features, num_classes)
        self.weight, self.bias = _replicate(w, G), _replicate(b, G)

    def forward(self, x: torch.Tensor, sl: slice = slice(None)) -> torch.Tensor:
        x = self.bn(x, sl)
        return torch.baddbmm(self.bias[sl].unsqueeze(-1), self.weight[sl].transpose(1, 2), x.transpose(1, 2)).transpose(1, 2)


class LinearHead(nn.Module):
    """Concatenate the T selected tokens (T*D features) -> BatchNorm1d -> Linear."""

    kind = "linear"

    def __init__(self, G: int, num_tokens: int, width: int, num_classes: int, dropout: torch.Tensor | None = None):
        super().__init__()
        self.G, self.num_tokens, self.width, self.num_classes = G, num_tokens, width, num_classes
        self.classifier = Classifier(G, num_tokens * width, num_classes)

    def forward(self, x: torch.Tensor, sl: slice = slice(None), drop_u=None) -> torch.Tensor:
        """x (B, T, D) shared by all configurations -> logits (G', B, C).

        Training: every configuration sees the same input, so BatchNorm's batch statistics are shared; the
        input is normalised once and each configuration's BN affine is folded into its linear map, which
        makes the whole grid one matrix product. Same function as BN -> Linear per configuration."""
        B = x.shape[0]
        flat = x.reshape(B, -1)
        if not self.training:
            g = len(range(self.G)[sl])
            return self.classifier(flat.unsqueeze(0).expand(g, -1, -1), sl)
        bn, clf = self.classifier.bn, self.classifier
        mean, var = flat.new_zeros(flat.shape[1]), flat.new_ones(flat.shape[1])
        # torch's kernel normalises and, with momentum 1, leaves the batch mean and unbiased variance in mean/var
        xn = F.batch_norm(flat, mean, var, training=True, momentum=1.0, eps=bn.eps)  # (B, F), shared
        bn.track(sl, mean, var)
        W = clf.weight[sl]  # (g, F, C)
        g, F_, C = W.shape
        Wf = bn.weight[sl].unsqueeze(-1) * W
        bias = torch.einsum("gf,gfc->gc", bn.bias[sl], W) + clf.bias[sl]
        out = torch.addmm(bias.reshape(g * C, 1), Wf.permute(1, 0, 2).reshape(F_, g * C).t(), xn.t())  # (g*C, B)
        return out.view(g, C, B).transpose(1, 2)  # class-major, as Classifier

    def config(self) -> dict:
        return {"kind": self.kind, "num_tokens": self.num_tokens, "width": self.width, "num_classes": self.num_classes}


class PerTokenLinearHead(nn.Module):
    """Configuration g reads only token `token_index[g]` -> BatchNorm1d -> Linear (per-layer probes)."""

    kind = "per-token"

    def __init__(self, G: int, num_tokens: int, width: int, num_classes: int, token_index: torch.Tensor):
        super().__init__()
        self.G, self.num_tokens, self.width, self.num_classes = G, num_tokens, width, num_classes
        self.register_buffer("token_index", token_index.long().clone())
        self.classifier = Classifier(G, width, num_classes)

    def forward(self, x: torch.Tensor, sl: slice = slice(None), drop_u=None) -> torch.Tensor:
        return self.classifier(x[:, self.token_index[sl]].transpose(0, 1), sl)

    def config(self) -> dict:
        return {"kind": self.kind, "num_tokens": self.num_tokens, "width": self.width, "num_classes": self.num_classes,
                "token_index": self.token_index.tolist()}


class AttentionPoolHead(nn.Module):
    """The paper's single-query attention pool + classifier, batched over G configurations."""

    kind = "attention"

    def __init__(self, G: int, num_tokens: int, width: int, num_classes: int, num_heads: int,
                 dropout: torch.Tensor | None = None, eps: float = 1e-6):
        super().__init__()
        D, H = width, num_heads
        hd = 2 * (D // H)
        if hd < 1:
            raise ValueError(f"width {D} too small for {H} heads")
        self.G, self.num_tokens, self.width, self.num_classes = G, num_tokens, D, num_classes
        self.num_heads, self.head_dim, self.inner, self.eps = H, hd, H * hd, eps
        self.register_buffer("dropout", torch.zeros(G) if dropout is None else dropout.float().clone())
        self.query = _replicate(torch.randn(D) * 0.02, G)
        for name in ("q", "k", "v"):
            setattr(self, f"ln_{name}_weight", nn.Parameter(torch.ones(G, D)))
            setattr(self, f"ln_{name}_bias", nn.Parameter(torch.zeros(G, D)))
        self.w_q = _replicate(_linear_init(D, H * hd, bias=False)[0], G)  # (G, D, H*hd)
        self.w_k = _replicate(_linear_init(D, H * hd, bias=False)[0], G)
        self.w_v = _replicate(_linear_init(D, H * hd, bias=False)[0], G)
        w, b = _linear_init(H * hd, D)
        self.proj_weight, self.proj_bias = _replicate(w, G), _replicate(b, G)
        self.classifier = Classifier(G, D, num_classes)
        self._last_attention: torch.Tensor | None = None

    # -- pieces shared by both orders of computation
    def _queries(self, sl: slice) -> torch.Tensor:
        q_in = F.layer_norm(self.query[sl], (self.width,), eps=self.eps) * self.ln_q_weight[sl] + self.ln_q_bias[sl]
        q = torch.einsum("gd,gde->ge", q_in, self.w_q[sl])
        return q.view(q.shape[0], self.num_heads, self.head_dim)  # (G, H, hd)

    def _drop_attention(self, a: torch.Tensor, sl: slice, drop_u: torch.Tensor | None) -> torch.Tensor:
        if not self.training or drop_u is None:
            return a
        p = self.dropout[sl].view(-1, 1, 1, 1)
        keep = (drop_u.unsqueeze(0) >= p).to(a.dtype)
        return a * keep / (1 - p)

    def _output(self, v: torch.Tensor, sl: slice, drop_o: torch.Tensor | None) -> torch.Tensor:
        g, B = v.shape[:2]
        out = torch.baddbmm(self.proj_bias[sl].unsqueeze(1), v.reshape(g, B, self.inner), self.proj_weight[sl])
        if self.training and drop_o is not None:
            p = self.dropout[sl].view(-1, 1, 1)
            out = out * (drop_o.unsqueeze(0) >= p).to(out.dtype) / (1 - p)
        return self.classifier(out, sl)

    def forward(self, x: torch.Tensor, sl: slice = slice(None), drop_u=None) -> torch.Tensor:
        """Factored single-query attention: never forms per-token keys or values. x (B, T, D).

        Layout: the logits of all configurations and heads come from one matrix product as (B, T, g*H), the
        softmax runs over T (a middle axis, so along long contiguous rows), the pooling is one batched product
        per sample and the value projection one per (configuration, head), reading the pooled vectors in place.
        Same function as `forward_direct`; 2x faster than einsum-ordered code for a 21-configuration grid."""
        drop_a, drop_o = drop_u if drop_u is not None else (None, None)
        B, T, D = x.shape
        H, e = self.num_heads, self.head_dim
        xhat = F.layer_norm(x, (D,), eps=self.eps)  # shared by every configuration
        q = self._queries(sl)
        g = q.shape[0]
        wk = self.w_k[sl].view(g, D, H, e)
        u = torch.einsum("gdhe,ghe->ghd", wk, q) * self.ln_k_weight[sl].unsqueeze(1) / math.sqrt(e)
        logits = torch.matmul(xhat, u.reshape(g * H, D).t())  # (B, T, gH); + per-head constants, which cancel
        a = logits.softmax(dim=1)
        self._last_attention = a.detach().view(B, T, g, H).permute(2, 0, 3, 1)  # (g, B, H, T) view
        if self.training and drop_a is not None:  # drop_a (B, H, T): the same draws for every configuration
            p = self.dropout[sl].view(1, 1, g, 1)
            keep = (drop_a.transpose(1, 2).unsqueeze(2) >= p).to(a.dtype)
            a = (a.view(B, T, g, H) * keep / (1 - p)).view(B, T, g * H)
        pooled = torch.bmm(a.transpose(1, 2), xhat)  # (B, gH, D)
        # ((sum_t a xhat) * g_v + (sum_t a) b_v) W_v = pooled (g_v W_v) + (sum_t a) (b_v W_v): fold the LN affine
        wv = self.w_v[sl].view(g, D, H, e)
        wv_g = (self.ln_v_weight[sl].view(g, D, 1, 1) * wv).permute(0, 2, 1, 3).reshape(g * H, D, e)
        v = torch.bmm(pooled.transpose(0, 1), wv_g)  # (gH, B, e)
        bv = torch.einsum("gd,gdhe->ghe", self.ln_v_bias[sl], wv).reshape(g * H, 1, e)
        v = v + a.sum(1).t().unsqueeze(-1) * bv  # sum_t a is 1 unless attention dropout removed some
        return self._output(v.view(g, H, B, e).permute(0, 2, 1, 3), sl, drop_o)

    def forward_direct(self, x: torch.Tensor, sl: slice = slice(None), drop_u=None) -> torch.Tensor:
        """Textbook order: LayerNorm and project every token to keys and values, then attend."""
        drop_a, drop_o = drop_u if drop_u is not None else (None, None)
        q = self._queries(sl)
        g, (B, T, _) = q.shape[0], x.shape
        xhat = F.layer_norm(x, (self.width,), eps=self.eps)
        k_in = xhat.unsqueeze(0) * self.ln_k_weight[sl].view(g, 1, 1, -1) + self.ln_k_bias[sl].view(g, 1, 1, -1)
        v_in = xhat.unsqueeze(0) * self.ln_v_weight[sl].view(g, 1, 1, -1) + self.ln_v_bias[sl].view(g, 1, 1, -1)
        k = torch.einsum("gbtd,gde->gbte", k_in, self.w_k[sl]).view(g, B, T, self.num_heads, self.head_dim)
        v = torch.einsum("gbtd,gde->gbte", v_in, self.w_v[sl]).view(g, B, T, self.num_heads, self.head_dim)
        logits = torch.einsum("gbthe,ghe->gbht", k, q) / math.sqrt(self.head_dim)
        a = logits.softmax(dim=-1)
        self._last_attention = a.detach()
        a = self._drop_attention(a, sl, drop_a)
        out = torch.einsum("gbht,gbthe->gbhe", a, v)
        return self._output(out, sl, drop_o)

    def last_attention(self) -> torch.Tensor:
        """(G, B, H, T) attention weights of the last forward pass."""
        return self._last_attention

    def config(self) -> dict:
        return {"kind": self.kind, "num_tokens": self.num_tokens, "width": self.width,
                "num_classes": self.num_classes, "num_heads": self.num_heads, "head_dim": self.head_dim}


def count_parameters(head: nn.Module, per_config: bool = True) -> int:
    """Trainable parameters of one configuration (every parameter carries the grid axis G first)."""
    params = list(head.parameters())
    if not per_config or not params:
        return sum(p.numel() for p in params)
    return sum(p[0].numel() for p in params)


def pool_parameters_formula(width: int, num_heads: int) -> int:
    """Parameters of the attention pool alone (no classifier), from the spec's formula."""
    D, inner = width, num_heads * 2 * (width // num_heads)
    return D + 3 * 2 * D + 3 * D * inner + inner * D + D  # query, 3 LNs, W_q/W_k/W_v, out proj + bias
