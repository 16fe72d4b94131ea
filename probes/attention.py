"""The paper's single-query attention pool + classifier, batched over G configurations.

As the authors' `AttentiveProbeModel` (attentive_probe.py): one learned query (N(0, .02)); LayerNorms (eps 1e-5)
on the query, key and value inputs; bias-free q/k/v maps; head dim 2 * (D // heads); softmax(q k^T / sqrt(head
dim)); dropout p on the attention weights only (their paper runs: attention_dropout = (0.0, p), i.e. no
projection dropout); output projection; no residual, no MLP; then BatchNorm1d (affine) -> Linear. Parameters are
initialised with the same random draws, in the same order, as that module under the same seed.

`forward` uses the exact single-query factorisation (ALF reference section 8): no per-token keys or values;
`forward_direct` computes them for every token (the textbook order), for checking.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Classifier, linear_init, replicate

LN_EPS = 1e-5  # torch.nn.LayerNorm's default, as in the authors' module


class AttentionHead(nn.Module):
    def __init__(self, G: int, num_tokens: int, width: int, num_classes: int, num_heads: int,
                 dropout: torch.Tensor | None = None, eps: float = LN_EPS):
        super().__init__()
        D, H = width, num_heads
        hd = 2 * (D // H)
        if hd < 1:
            raise ValueError(f"width {D} too small for {H} heads")
        self.G, self.num_tokens, self.width, self.num_classes = G, num_tokens, D, num_classes
        self.num_heads, self.head_dim, self.inner, self.eps = H, hd, H * hd, eps
        self.register_buffer("dropout", torch.zeros(G) if dropout is None else dropout.float().clone())
        for name in ("q", "k", "v"):
            setattr(self, f"ln_{name}_weight", nn.Parameter(torch.ones(G, D)))
            setattr(self, f"ln_{name}_bias", nn.Parameter(torch.zeros(G, D)))
        # the authors' draw order: q, k, v, output projection, classifier, then the query
        self.w_q = replicate(linear_init(D, H * hd, bias=False)[0], G)  # (G, D, H*hd)
        self.w_k = replicate(linear_init(D, H * hd, bias=False)[0], G)
        self.w_v = replicate(linear_init(D, H * hd, bias=False)[0], G)
        w, b = linear_init(H * hd, D)
        self.proj_weight, self.proj_bias = replicate(w, G), replicate(b, G)
        self.classifier = Classifier(G, D, num_classes)
        self.query = replicate(torch.empty(D).normal_(0.0, 0.02), G)
        self._last_attention: torch.Tensor | None = None

    # -- pieces shared by both orders of computation
    def _queries(self, sl: slice) -> torch.Tensor:
        q_in = F.layer_norm(self.query[sl], (self.width,), eps=self.eps) * self.ln_q_weight[sl] + self.ln_q_bias[sl]
        q = torch.einsum("gd,gde->ge", q_in, self.w_q[sl])
        return q.view(q.shape[0], self.num_heads, self.head_dim)  # (G, H, hd)

    def _output(self, v: torch.Tensor, sl: slice) -> torch.Tensor:
        g, B = v.shape[:2]
        out = torch.baddbmm(self.proj_bias[sl].unsqueeze(1), v.reshape(g, B, self.inner), self.proj_weight[sl])
        return self.classifier(out, sl)

    def forward(self, x: torch.Tensor, sl: slice = slice(None), draws=None) -> torch.Tensor:
        """Factored single-query attention: never forms per-token keys or values. x (B, T, D).

        The logits of all configurations and heads come from one matrix product as (B, T, g*H), the softmax runs
        over T, the pooling is one batched product per sample and the value projection one per (configuration,
        head), reading the pooled vectors in place. `draws` (B, H, T): uniform numbers shared by every
        configuration; a weight is dropped where its draw is below that configuration's dropout rate."""
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
        if self.training and draws is not None:
            p = self.dropout[sl].view(1, 1, g, 1)
            keep = (draws.transpose(1, 2).unsqueeze(2) >= p).to(a.dtype)
            a = (a.view(B, T, g, H) * keep / (1 - p)).view(B, T, g * H)
        pooled = torch.bmm(a.transpose(1, 2), xhat)  # (B, gH, D)
        # ((sum_t a xhat) * g_v + (sum_t a) b_v) W_v = pooled (g_v W_v) + (sum_t a) (b_v W_v): fold the LN affine
        wv = self.w_v[sl].view(g, D, H, e)
        wv_g = (self.ln_v_weight[sl].view(g, D, 1, 1) * wv).permute(0, 2, 1, 3).reshape(g * H, D, e)
        v = torch.bmm(pooled.transpose(0, 1), wv_g)  # (gH, B, e)
        bv = torch.einsum("gd,gdhe->ghe", self.ln_v_bias[sl], wv).reshape(g * H, 1, e)
        v = v + a.sum(1).t().unsqueeze(-1) * bv  # sum_t a is 1 unless attention dropout removed some
        return self._output(v.view(g, H, B, e).permute(0, 2, 1, 3), sl)

    def forward_direct(self, x: torch.Tensor, sl: slice = slice(None), draws=None) -> torch.Tensor:
        """Textbook order: LayerNorm and project every token to keys and values, then attend."""
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
        if self.training and draws is not None:
            p = self.dropout[sl].view(-1, 1, 1, 1)
            a = a * (draws.unsqueeze(0) >= p).to(a.dtype) / (1 - p)
        out = torch.einsum("gbht,gbthe->gbhe", a, v)
        return self._output(out, sl)

    @torch.no_grad()
    def zero_cancelled_grads(self) -> None:
        """Zero the gradients that are zero in exact arithmetic: the output projection's bias (a constant the
        classifier's BatchNorm subtracts again) and, for configurations that drop no attention weight, the value
        LayerNorm's bias (it adds (sum_t a_t) b_v W_v = b_v W_v, the same for every sample). In floating point
        they are rounding noise (~1e-8) that depends on the matrix shapes, and Adam turns any nonzero gradient
        into a step of about lr: left alone, these biases random-walk differently in a grid and alone."""
        if self.proj_bias.grad is not None:
            self.proj_bias.grad.zero_()
        if self.ln_v_bias.grad is not None:
            self.ln_v_bias.grad[self.dropout == 0] = 0.0

    def last_attention(self) -> torch.Tensor:
        """(G, B, H, T) attention weights of the last forward pass."""
        return self._last_attention


def pool_parameters_formula(width: int, num_heads: int) -> int:
    """Parameters of the attention pool alone (no classifier), from the spec's formula."""
    D, inner = width, num_heads * 2 * (width // num_heads)
    return D + 3 * 2 * D + 3 * D * inner + inner * D + D  # query, 3 LNs, W_q/W_k/W_v, out proj + bias
