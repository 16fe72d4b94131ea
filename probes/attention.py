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

from .layers import Classifier, linear_init, replicate, rows
from .pool import attention_pool

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
        q_in = F.layer_norm(rows(self.query, sl), (self.width,), eps=self.eps) * rows(self.ln_q_weight, sl) + rows(self.ln_q_bias, sl)
        q = torch.einsum("gd,gde->ge", q_in, rows(self.w_q, sl))
        return q.view(q.shape[0], self.num_heads, self.head_dim)  # (G, H, hd)

    def _output(self, v: torch.Tensor, sl: slice) -> torch.Tensor:
        """v (g, B, H, e) or (g, B, H * e) -> output projection -> classifier."""
        g, B = v.shape[:2]
        out = torch.baddbmm(rows(self.proj_bias, sl).unsqueeze(1), v.reshape(g, B, self.inner), rows(self.proj_weight, sl))
        return self.classifier(out, sl)

    def forward(self, x: torch.Tensor, sl: slice = slice(None), draws=None) -> torch.Tensor:
        """Factored single-query attention: never forms per-token keys or values, nor the normalised tokens.
        x (B, T, D).

        With xhat_t = (x_t - mu_t) r_t the affine-free LayerNorm of token t (mean mu_t, r_t = 1 / std), every use
        of xhat is rewritten on x plus per-token scalars: the logits xhat_t . u = r_t (x_t . u - mu_t sum(u)), and
        the pooled vector sum_t a_t xhat_t = sum_t (a_t r_t) x_t - (sum_t a_t r_t mu_t) 1 (`pool.py`, which
        also writes out the backward pass). The logits of all configurations and heads are one matrix product
        (B T, D) x (D, g*H), the softmax runs over T, the pooling is one batched product per sample and the value
        projection one per (configuration, head). `draws` (B, H, T): uniform numbers shared by every
        configuration; a weight is dropped where its draw is below that configuration's dropout rate."""
        B, T, D = x.shape
        H, e = self.num_heads, self.head_dim
        q = self._queries(sl)
        g = q.shape[0]
        keep = None
        if self.training and draws is not None:
            p = self.dropout[sl].view(1, 1, g, 1)
            keep = ((draws.transpose(1, 2).unsqueeze(2) >= p).to(x.dtype) / (1 - p)).reshape(B, T, g * H)
        v, a = attention_pool(x, self.eps, q, rows(self.w_k, sl), rows(self.ln_k_weight, sl), rows(self.w_v, sl),
                              rows(self.ln_v_weight, sl), rows(self.ln_v_bias, sl), keep)  # (B, gH, e), (B, T, gH)
        self._last_attention = a.view(B, T, g, H).permute(2, 0, 3, 1)  # (g, B, H, T) view
        return self._output(v.view(B, g, H * e).transpose(0, 1), sl)

    def forward_direct(self, x: torch.Tensor, sl: slice = slice(None), draws=None) -> torch.Tensor:
        """Textbook order: LayerNorm and project every token to keys and values, then attend."""
        q = self._queries(sl)
        g, (B, T, _) = q.shape[0], x.shape
        xhat = F.layer_norm(x, (self.width,), eps=self.eps)
        k_in = xhat.unsqueeze(0) * rows(self.ln_k_weight, sl).view(g, 1, 1, -1) + rows(self.ln_k_bias, sl).view(g, 1, 1, -1)
        v_in = xhat.unsqueeze(0) * rows(self.ln_v_weight, sl).view(g, 1, 1, -1) + rows(self.ln_v_bias, sl).view(g, 1, 1, -1)
        k = torch.einsum("gbtd,gde->gbte", k_in, rows(self.w_k, sl)).view(g, B, T, self.num_heads, self.head_dim)
        v = torch.einsum("gbtd,gde->gbte", v_in, rows(self.w_v, sl)).view(g, B, T, self.num_heads, self.head_dim)
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
