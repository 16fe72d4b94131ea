"""The factored single-query attention pool with its backward pass written out.

Per configuration-head j (g configurations x H heads, flattened to gH): the key direction u_j (D,) (the query
through the key map and the key LayerNorm's gain, over sqrt(head dim)), the value map V_j (D, e) (the value
LayerNorm's gain folded in) and b_j (e,) (the value LayerNorm's bias through the value map). Tokens x (B, T, D)
with per-token mean mu and 1 / std r; xhat = (x - mu) r is never formed:

    logits[b, t, j] = r (x . u_j - mu sum(u_j))          one (B T, D) x (D, gH) product
    a = softmax over t, a' = a * keep (dropout)           keep: (B, T, gH) 0 or 1 / (1 - p), or None
    w = a' r
    pooled[b, j] = sum_t w x_t                            per-sample (gH, T) x (T, D)
    v[b, j] = pooled V_j - (sum_t w mu) sum_d V_j + (sum_t a') b_j

Autograd's own backward of these lines gives the same numbers, but it cannot choose the layouts: here each product
is taken in the orientation measured fastest for it, parameter gradients come out in the parameters' own layout
(autograd's went through broadcast multiplies and transposing copies of weight size), and the forward takes the
tokens a cache-sized chunk of samples at a time, so statistics, logits and pooling read them from memory once.
Measured A/B on 2 CPU cores, one ALF training step at the ViT-B and ViT-L shapes: 1.10x and 1.09x autograd's speed
(README -> Performance).
"""
from __future__ import annotations

import torch


def token_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean and 1 / std of x (..., D), as LayerNorm computes them.

    One pass (var = E[x^2] - mean^2, from two fast reductions; torch's var_mean kernel is several times slower on
    CPU and the two-pass form writes a copy of x). Where the mean dominates the spread so much that float32 would
    lose digits in that difference, the batch falls back to the two-pass form."""
    D = x.shape[-1]
    mu = x.mean(-1)
    meansq = torch.linalg.vector_norm(x, dim=-1).square_().div_(D)
    var = meansq - mu.square()
    if bool((var < 1e-3 * meansq).any()):
        var = torch.linalg.vector_norm(x - mu.unsqueeze(-1), dim=-1).square_().div_(D)
    return mu, torch.rsqrt(var.clamp_(min=0) + eps)


CHUNK_BYTES = 4 << 20  # tokens per forward chunk: read once from memory, then reused from cache


def _samples_per_chunk(x: torch.Tensor, gH: int) -> int:
    """Samples per forward chunk: a CPU cache's worth of tokens. The whole batch where chunks gained nothing as
    measured: on a GPU (each chunk costs kernel launches) and for a grid group, which writes many times more
    pooled output than it reads tokens."""
    B, T, D = x.shape
    if x.device.type != "cpu" or gH > 2 * T:
        return B
    return max(1, CHUNK_BYTES // (T * D * x.element_size()))


class _AttentionPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps, q, Wk, gk, Wv, gv, bv, keep):
        B, T, D = x.shape
        g, H, e = q.shape
        gH = g * H
        # key direction per head: u = (W_k q) * g_k / sqrt(e); value map with the gain folded in; bias through it
        kq = torch.einsum("gdhe,ghe->ghd", Wk.view(g, D, H, e), q)  # (g, H, D)
        u = (kq * gk.unsqueeze(1)).mul_(e ** -0.5).view(gH, D)
        usum = u.sum(1)
        V = (gv.unsqueeze(-1) * Wv).view(g, D, H, e).transpose(1, 2).reshape(gH, D, e)
        b = torch.bmm(bv.unsqueeze(1), Wv).view(gH, e)
        # token statistics, logits, softmax and pooling a chunk of samples at a time, so that the chunk's tokens
        # come from memory once and stay in cache for the pooling (whole-batch products read them three times)
        mu, r = x.new_empty(B, T), x.new_empty(B, T)
        a, w, pooled = x.new_empty(B, T, gH), x.new_empty(B, T, gH), x.new_empty(B, gH, D)
        total = x.new_empty(B, gH)  # sum_t a'
        step = _samples_per_chunk(x, gH)
        for s in range(0, B, step):
            xc, sl = x[s:s + step], slice(s, s + step)
            mu[sl], r[sl] = token_stats(xc, eps)
            logits = torch.mm(xc.reshape(-1, D), u.t()).view(xc.shape[0], T, gH)
            logits.sub_(mu[sl].unsqueeze(-1) * usum).mul_(r[sl].unsqueeze(-1))
            torch.softmax(logits, dim=1, out=a[sl])
            a_kept = a[sl] if keep is None else a[sl] * keep[sl]
            torch.sum(a_kept, 1, out=total[sl])
            torch.mul(a_kept, r[sl].unsqueeze(-1), out=w[sl])
            torch.bmm(w[sl].transpose(1, 2), xc, out=pooled[sl])
        shift = torch.bmm(mu.unsqueeze(1), w).squeeze(1)  # (B, gH): sum_t w mu
        Vsum = V.sum(1)  # (gH, e)
        v = torch.empty(B, gH, e, dtype=x.dtype, device=x.device)
        torch.bmm(pooled.transpose(0, 1), V, out=v.transpose(0, 1))
        v.addcmul_(total.unsqueeze(-1), b).sub_(shift.unsqueeze(-1) * Vsum)
        ctx.save_for_backward(x, mu, r, a, keep, pooled, shift, total, V, Vsum, b, kq, q, Wk, gk, Wv, gv, bv)
        ctx.mark_non_differentiable(a)
        return v, a

    @staticmethod
    def backward(ctx, dv, _):
        x, mu, r, a, keep, pooled, shift, total, V, Vsum, b, kq, q, Wk, gk, Wv, gv, bv = ctx.saved_tensors
        B, T, D = x.shape
        g, H, e = q.shape
        gH = g * H
        dvt = dv.contiguous().transpose(0, 1)  # (gH, B, e)
        # the value map: dV_j = pooled_j^T dv_j - 1 (shift_j^T dv_j); db_j = total_j^T dv_j
        # (gH, D, e): the (gH, e, D) orientation multiplies faster, but moving it into the parameter's (D, H e)
        # layout is a transpose that costs more than it saves (measured); from this one, rows of e stay contiguous
        dV = torch.bmm(pooled.permute(1, 2, 0), dvt)
        dV.sub_(torch.bmm(shift.t().unsqueeze(1), dvt))
        db = torch.bmm(total.t().unsqueeze(1), dvt).view(g, H * e)
        # back to the attention weights
        dpooled = torch.bmm(dvt, V.transpose(1, 2))  # (gH, B, D)
        dshift = -(dv * Vsum).sum(-1)  # (B, gH)
        dtotal = (dv * b).sum(-1)
        dw = torch.bmm(x, dpooled.permute(1, 2, 0))  # (B, T, gH)
        dw.addcmul_(mu.unsqueeze(-1), dshift.unsqueeze(1))
        da = dw.mul_(r.unsqueeze(-1)).add_(dtotal.unsqueeze(1))  # d a'
        if keep is not None:
            da.mul_(keep)
        # softmax over t, then the logits' scale r; u's gradient comes out (gH, D)
        dlogits = da.sub_((a * da).sum(1, keepdim=True)).mul_(a).mul_(r.unsqueeze(-1)).view(B * T, gH)
        du = torch.mm(dlogits.t(), x.view(B * T, D))
        du.sub_(torch.mm(mu.view(1, B * T), dlogits).t())
        # through u = (W_k q) g_k / sqrt(e) and V = g_v W_v, b = b_v W_v, into the parameters' own layouts
        du = du.view(g, H, D)
        dkq = du * gk.unsqueeze(1) * e ** -0.5
        dgk = (du * kq).sum(1).mul_(e ** -0.5)
        dWk = (dkq.transpose(1, 2).contiguous().unsqueeze(-1) * q.unsqueeze(1)).view(g, D, H * e)
        dq = torch.einsum("gdhe,ghd->ghe", Wk.view(g, D, H, e), dkq)
        dVp = dV.view(g, H, D, e).transpose(1, 2).reshape(g, D, H * e)  # (g, D, H e)
        dgv = (dVp * Wv).sum(-1)
        dbv = torch.bmm(Wv, db.unsqueeze(-1)).squeeze(-1)
        dWv = torch.baddbmm(dVp.mul_(gv.unsqueeze(-1)), bv.unsqueeze(-1), db.unsqueeze(1))
        return None, None, dq, dWk, dgk, dWv, dgv, dbv, None


def attention_pool(x, eps, q, Wk, gk, Wv, gv, bv, keep=None):
    """Tokens x (B, T, D) (their LayerNorm without affine: eps); per configuration the query after its map
    q (g, H, e), the key and value maps Wk, Wv (g, D, H e) with the gains of their LayerNorms gk, gv (g, D) and
    the value LayerNorm's bias bv (g, D) (the key bias only shifts every logit of a head: softmax cancels it);
    keep (B, T, g H) or None -> the values v (B, g H, e) and the attention weights a (B, T, g H) before dropout
    (no gradient)."""
    return _AttentionPool.apply(x, eps, q, Wk, gk, Wv, gv, bv, keep)
