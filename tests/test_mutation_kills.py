"""Tests written from the survivors of `make mutate` (docs/MUTATION.md): each pins a behaviour that the mutation
tool showed no other test checked. Every expected value comes from an independent computation (torch's own
optimiser, a formula written out here, a hand count), never from the code under test."""
import math

import numpy as np
import pytest
import torch

from probes.optim import BatchedAdamW, cosine_lr


# ------------------------------------------------------------------------------------------ optimiser
def _torch_reference(W0, grads, lrs, wds, clip, betas=(0.9, 0.999), eps=1e-8):
    """Each configuration alone through torch.optim.AdamW (+ clip_grad_norm_), a fixed lr per configuration."""
    out = []
    for g in range(W0.shape[0]):
        p = torch.nn.Parameter(W0[g].clone())
        opt = torch.optim.AdamW([p], lr=float(lrs[g]), weight_decay=float(wds[g]), betas=betas, eps=eps,
                                foreach=False, fused=False)
        for grad in grads:
            opt.zero_grad()
            p.grad = grad[g].clone()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_([p], clip)
            opt.step()
        out.append(p.detach())
    return torch.stack(out)


def _ours(W0, grads, lrs, wds, clip, **kw):
    W = torch.nn.Parameter(W0.clone())
    opt = BatchedAdamW([W], lrs, wds, **kw)
    for grad in grads:
        opt.zero_grad()
        W.grad = grad.clone()
        if clip is not None:
            opt.clip_grad_norm(clip)
        opt.step(lrs)
    return W.detach(), opt


def test_adamw_equals_torch_with_other_betas_and_eps():
    """Each configuration's row equals torch.optim.AdamW, with non-default betas and eps, clipping active on one
    configuration only."""
    torch.manual_seed(1)
    W0 = torch.randn(3, 4, 2)
    grads = [torch.randn(3, 4, 2) * torch.tensor([0.01, 1.0, 30.0]).view(3, 1, 1) for _ in range(6)]
    lrs, wds = torch.tensor([0.1, 0.03, 0.01]), torch.tensor([0.0, 0.2, 1e-3])
    kw = dict(betas=(0.8, 0.95), eps=1e-3)
    got, _ = _ours(W0, grads, lrs, wds, 2.0, **kw)
    want = _torch_reference(W0, grads, lrs, wds, 2.0, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the defaults are torch's defaults
    got, _ = _ours(W0, grads, lrs, wds, None)
    torch.testing.assert_close(got, _torch_reference(W0, grads, lrs, wds, None), rtol=1e-5, atol=1e-6)


def test_clip_returns_each_configurations_norm_and_scales_only_large_ones():
    """clip_grad_norm returns the norm before clipping, per configuration (as clip_grad_norm_ returns the total
    norm), and leaves a gradient below the limit unchanged."""
    W = torch.nn.Parameter(torch.zeros(2, 3))
    b = torch.nn.Parameter(torch.zeros(2, 1))
    opt = BatchedAdamW([W, b], torch.tensor([0.1, 0.1]), torch.tensor([0.0, 0.0]))
    opt.zero_grad()
    W.grad = torch.tensor([[3.0, 0.0, 0.0], [0.3, 0.0, 0.0]])
    b.grad = torch.tensor([[4.0], [0.4]])
    norm = opt.clip_grad_norm(1.0)
    torch.testing.assert_close(norm, torch.tensor([5.0, 0.5]))  # sqrt(3^2 + 4^2): both parameters together
    torch.testing.assert_close(W.grad, torch.tensor([[0.6, 0.0, 0.0], [0.3, 0.0, 0.0]]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, torch.tensor([[0.8], [0.4]]), rtol=1e-5, atol=1e-6)
    # a vanishing gradient (norm below the 1e-6 guard) is left alone too
    opt.zero_grad()
    W.grad = torch.tensor([[3e-7, 0.0, 0.0], [0.0, 0.0, 0.0]])
    b.grad = torch.tensor([[4e-7], [0.0]])
    opt.clip_grad_norm(1.0)
    torch.testing.assert_close(W.grad, torch.tensor([[3e-7, 0.0, 0.0], [0.0, 0.0, 0.0]]), rtol=1e-6, atol=0)
    torch.testing.assert_close(b.grad, torch.tensor([[4e-7], [0.0]]), rtol=1e-6, atol=0)


def test_a_parameter_without_gradient_steps_with_zero_gradient():
    """A parameter whose .grad is None after backward (unused) is updated with a zero gradient - not with the
    gradient left in the buffer by the step before."""
    torch.manual_seed(2)
    W0, grad = torch.randn(2, 3), torch.randn(2, 3)
    lrs, wds = torch.tensor([0.1, 0.05]), torch.tensor([0.1, 0.0])
    W = torch.nn.Parameter(W0.clone())
    opt = BatchedAdamW([W], lrs, wds)
    opt.zero_grad()
    W.grad = grad.clone()
    opt.step(lrs)
    W.grad = None
    opt.step(lrs)
    want, _ = _ours(W0, [grad, torch.zeros(2, 3)], lrs, wds, None)
    torch.testing.assert_close(W.detach(), want)
    ref = _torch_reference(W0, [grad, torch.zeros(2, 3)], lrs, wds, None)
    torch.testing.assert_close(W.detach(), ref, rtol=1e-5, atol=1e-6)


def test_backward_writes_straight_into_the_flat_buffer():
    """After zero_grad every parameter's .grad is its zeroed view of the one gradient buffer, so backward
    accumulates into that buffer in place (no per-parameter gradients to gather)."""
    W = torch.nn.Parameter(torch.randn(2, 3, 4))
    b = torch.nn.Parameter(torch.randn(2, 4))
    c = torch.nn.Parameter(torch.randn(2, 2))
    opt = BatchedAdamW([W, b, c], torch.tensor([0.1, 0.1]), torch.tensor([0.0, 0.0]))
    assert [v.shape for v in opt.views] == [(2, 3, 4), (2, 4), (2, 2)]
    torch.testing.assert_close(opt.flat, torch.cat([W.detach().reshape(2, -1), b.detach(), c.detach()], 1))
    opt.grad.fill_(7.0)
    opt.zero_grad()
    assert all(p.grad is not None and p.grad.data_ptr() == v.data_ptr() for p, v in zip(opt.params, opt.views))
    assert not opt.grad.any()
    x = torch.randn(5, 3)
    with torch.autograd.enforce_grad_layout_policy(False):
        ((x @ W[0] + b[0]).sum() + 2 * (x @ W[1] + b[1]).sum() + (3 * c[0] - c[1]).sum()).backward()
    want = torch.cat([torch.stack([x.sum(0)[:, None].expand(3, 4), 2 * x.sum(0)[:, None].expand(3, 4)]).reshape(2, -1),
                      torch.tensor([[5.0] * 4, [10.0] * 4]), torch.tensor([[3.0, 3.0], [-1.0, -1.0]])], 1)
    torch.testing.assert_close(opt.grad, want)  # already in the buffer, before any gather
    # every parameter is a view of its own columns of the flat buffer: a step moves them together
    opt.step(torch.tensor([0.1, 0.1]))
    torch.testing.assert_close(opt.flat, torch.cat([W.detach().reshape(2, -1), b.detach(), c.detach()], 1))


def test_frozen_parameters_are_left_out_and_grid_axis_checked():
    W = torch.nn.Parameter(torch.ones(2, 3))
    frozen = torch.nn.Parameter(torch.ones(5, 7), requires_grad=False)  # no grid axis: must not matter
    opt = BatchedAdamW([W, frozen], torch.tensor([0.1, 0.1]), torch.tensor([0.0, 0.0]))
    assert opt.params == [W] and opt.flat.shape == (2, 3)
    with pytest.raises(ValueError, match="grid axis G=2"):
        BatchedAdamW([torch.nn.Parameter(torch.ones(3, 2))], torch.tensor([0.1, 0.1]), torch.tensor([0.0, 0.0]))


def test_cosine_lr_is_torchs_closed_form():
    """min + (base - min)(1 + cos(pi t / T)) / 2 at the start, the middle, the end; T = 0 counts as 1."""
    base = torch.tensor([0.1, 0.01])
    for t, T in ((0, 10), (5, 10), (10, 10), (3, 7), (0, 0), (1, 1), (0, 1)):
        want = [1e-6 + (b - 1e-6) * (1 + math.cos(math.pi * t / max(T, 1))) / 2 for b in (0.1, 0.01)]
        np.testing.assert_allclose(cosine_lr(base, t, T, 1e-6).numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(cosine_lr(base, 10, 10, 1e-3).numpy(), [1e-3, 1e-3], rtol=1e-6)


# ------------------------------------------------------------------------------------------ protocol
from probes.errors import ProbeError  # noqa: E402
from probes.protocol import PROTOCOLS, Protocol, authors_batch_size, resolve_protocol  # noqa: E402


@pytest.mark.parametrize("bad, words", [
    (dict(lr=()), "at least one value"), (dict(wd=()), "at least one value"), (dict(dropout=()), "at least one value"),
    (dict(dropout=(0.0, 1.0)), "dropout must be in [0, 1)"), (dict(dropout=(-0.1,)), "dropout must be in [0, 1)"),
    (dict(lr=(0.1, 0.0)), "learning rates must be > 0"), (dict(lr=(-1e-3,)), "learning rates must be > 0"),
    (dict(wd=(-1e-9,)), "weight decays >= 0"),
    (dict(epochs=0), "at least 1"), (dict(min_steps=-1), "at least 1"), (dict(batch_size=0), "at least 1"),
    (dict(min_batches=0), "at least 1"),
    (dict(val_fraction=0.0), "val_fraction must be in (0, 1)"), (dict(val_fraction=1.0), "val_fraction"),
])
def test_protocol_refuses_each_bad_field_by_name(bad, words):
    with pytest.raises(ProbeError) as e:
        Protocol(name="mine", **bad)
    assert words in str(e.value) and "protocol 'mine'" in str(e.value)


def test_protocol_accepts_the_edges():
    p = Protocol(dropout=(0.0, 0.999), lr=(1e-9,), wd=(0.0,), epochs=1, min_steps=0, batch_size=1, min_batches=1,
                 val_fraction=0.01)
    assert p.dropout == (0.0, 0.999) and p.wd == (0.0,)
    Protocol(val_fraction=0.99)


def test_batch_rule_refuses_empty_input_and_honours_min_batches():
    for batch, n in ((0, 100), (64, 0), (-1, 10)):
        with pytest.raises(ProbeError, match=f"cannot form batches of {batch} from {n} samples"):
            authors_batch_size(batch, n)
    assert authors_batch_size(2048, 1) == 1 and authors_batch_size(1, 1) == 1  # one sample: a batch of one
    assert authors_batch_size(1, 10) == 1  # batches of one are valid
    # hand counts: 100 samples, batch 20 -> 5 full batches, nothing left: kept with min_batches 5, not with 6
    assert authors_batch_size(20, 100, min_batches=5) == 20
    # 6 batches: the only candidate is 100 // 6 + 1 = 17 (the rule stops above 16), and 100 // 17 = 5 < 6 -> 1
    assert authors_batch_size(20, 100, min_batches=6) == 1
    assert authors_batch_size(20, 120, min_batches=6) == 20  # 6 full batches, nothing left
    assert authors_batch_size(20, 110, min_batches=5) == 20  # 5 full batches + 10 = half a batch: kept
    # 109: 5 x 20 + 9 < 10 -> search from 109 // 5 + 1 = 22 down: 22 gives 4 full batches, 21 and 20 leave 4 and 9
    # (less than half), 19 gives 5 x 19 + 14 >= 9.5
    assert authors_batch_size(20, 109, min_batches=5) == 19


def test_batch_size_for_uses_the_protocols_min_batches():
    assert Protocol(batch_size=20, min_batches=6).batch_size_for(100) == 1  # see the hand count above
    assert Protocol(batch_size=20, min_batches=5).batch_size_for(100) == 20


def test_epochs_and_steps_by_hand():
    p = Protocol(epochs=40, min_steps=1000)
    assert p.epochs_for(1000, 40) == 40  # 25 batches x 40 = 1000 steps: exactly enough
    assert p.epochs_for(999, 40) == 40  # 25 batches (the last partial) x 40 = 1000
    assert p.epochs_for(960, 40) == 42  # 24 batches x 40 = 960 < 1000 -> ceil(1000 / 24) = 42
    assert p.steps(960, 40) == 42 * 24
    assert p.epochs_for(100, 200) == 1000  # one batch per epoch -> 1000 epochs
    assert Protocol(epochs=3, min_steps=0).epochs_for(10, 5) == 3
    assert Protocol(epochs=1, min_steps=1).epochs_for(5, 5) == 1
    assert p.steps(1000, 40) == 1000 and p.steps(1001, 40) == 26 * 40


def test_configs_and_describe():
    p = Protocol(lr=(0.1, 0.01), wd=(0.0, 1.0), dropout=(0.0, 0.5))
    assert p.configs(with_dropout=False) == [{"lr": 0.1, "wd": 0.0, "dropout": 0.0}, {"lr": 0.1, "wd": 1.0, "dropout": 0.0},
                                            {"lr": 0.01, "wd": 0.0, "dropout": 0.0}, {"lr": 0.01, "wd": 1.0, "dropout": 0.0}]
    assert [c["dropout"] for c in p.configs(with_dropout=True)] == [0.0] * 4 + [0.5] * 4
    d = p.describe()
    assert d["lr"] == [0.1, 0.01] and d["dropout"] == [0.0, 0.5] and d["epochs"] == 40 and d["name"] == "paper"
    assert set(d) == {f for f in Protocol.__dataclass_fields__} and isinstance(d["wd"], list)


def test_resolve_protocol():
    p = Protocol(name="x", epochs=3)
    assert resolve_protocol(p) is p
    assert resolve_protocol("quick") is PROTOCOLS["quick"]
    with pytest.raises(ProbeError) as e:
        resolve_protocol("papr")
    assert str(e.value) == "unknown protocol 'papr'; did you mean 'paper'? (known: paper, clean, quick)"
    c = resolve_protocol({"lr": [0.5], "epochs": 2})
    assert c.name == "paper+custom" and c.lr == (0.5,) and c.epochs == 2 and c.wd == PROTOCOLS["paper"].wd
    c = resolve_protocol({"base": "quick", "wd": [0.0, 0.1]})
    assert c.name == "quick+custom" and c.wd == (0.0, 0.1) and c.batch_size == PROTOCOLS["quick"].batch_size
    with pytest.raises(ProbeError) as e:
        resolve_protocol({"base": "paper", "lrs": [1], "zz": 2})
    assert "unknown protocol field(s) lrs, zz" in str(e.value) and "known: all_tokens_normalise, batch_size" in str(e.value)
    with pytest.raises(ProbeError, match=r"protocol must be a name \(paper, clean, quick\), a dict or a Protocol, not int"):
        resolve_protocol(3)
    with pytest.raises(ProbeError, match="dropout must be in"):
        resolve_protocol({"dropout": [1.5]})


# ------------------------------------------------------------------------------------------ attention pool
from probes import pool as pool_module  # noqa: E402


def test_token_stats_equal_layernorm_statistics_even_where_the_mean_dominates():
    """Mean and 1 / sqrt(var + eps) per token as LayerNorm computes them (float64 reference), for ordinary tokens,
    a token whose mean dwarfs its spread (one row only: the two-pass fallback must be taken for the batch), and a
    constant token (variance 0 -> 1 / sqrt(eps))."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 64, generator=g)
    x[1, 2] = 1000.0 + 0.01 * torch.randn(64, generator=g)
    x[2, 0] = 3.0
    for eps in (1e-5, 1e-2):
        mu, r = pool_module.token_stats(x, eps)
        x64 = x.double()
        var, mean = torch.var_mean(x64, dim=-1, unbiased=False)
        torch.testing.assert_close(mu.double(), mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r.double(), 1 / torch.sqrt(var + eps), rtol=1e-4, atol=0)
    assert abs(float(pool_module.token_stats(x, 1e-5)[1][2, 0]) - 1e-5 ** -0.5) < 1e-2


def test_token_stats_fall_back_where_one_pass_loses_digits_but_not_all():
    """Mean 10, spread 0.01 (float32): the one-pass variance keeps only about one digit (9% off in 1 / std) without
    collapsing to zero, so only the fallback rule itself (var < 1e-3 * E[x^2]) decides - a float64 reference."""
    g = torch.Generator().manual_seed(1)
    x = 10 + 0.01 * torch.randn(6, 64, generator=g)
    mu, r = pool_module.token_stats(x, 1e-5)
    var, mean = torch.var_mean(x.double(), dim=-1, unbiased=False)
    torch.testing.assert_close(r.double(), 1 / torch.sqrt(var + 1e-5), rtol=1e-4, atol=0)


def _reference_pool(x, eps, q, Wk, gk, Wv, gv, bv):
    """The attention pool written the plain way (LayerNorm, key and value maps, softmax over tokens, weighted
    sum), per configuration g and head h: v (B, g H, e), a (B, T, g H)."""
    B, T, D = x.shape
    G, H, e = q.shape
    xhat = torch.nn.functional.layer_norm(x, (D,), eps=eps)
    vs, As = [], []
    for c in range(G):
        k = ((xhat * gk[c]) @ Wk[c]).view(B, T, H, e)
        val = ((xhat * gv[c] + bv[c]) @ Wv[c]).view(B, T, H, e)
        a = torch.softmax(torch.einsum("bthe,he->bth", k, q[c]) / e ** 0.5, dim=1)
        vs.append(torch.einsum("bth,bthe->bhe", a, val))
        As.append(a)
    return torch.cat(vs, 1), torch.cat(As, 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_pool_equals_the_plain_computation_in_its_dtype(dtype):
    """Values, attention weights and every parameter's gradient equal the plain computation's, and come out in
    the tokens' dtype (float64 tokens give float64 values, to float64 precision)."""
    g = torch.Generator().manual_seed(3)
    B, T, D, G, H, e = 5, 7, 12, 2, 3, 4
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = rnd(B, T, D) * 2 + 0.5
    params = [rnd(G, H, e), rnd(G, D, H * e) / 3, 1 + rnd(G, D) / 5, rnd(G, D, H * e) / 3, 1 + rnd(G, D) / 5,
              rnd(G, D) / 5]
    mine = [p.detach().clone().to(dtype).requires_grad_() for p in params]
    ref = [p.detach().clone().requires_grad_() for p in params]
    v, a = pool_module.attention_pool(x.to(dtype), 1e-5, *mine)
    rv, ra = _reference_pool(x, 1e-5, *ref)
    assert v.dtype == dtype and a.dtype == dtype
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v.double(), rv, **tol)
    torch.testing.assert_close(a.double(), ra, **tol)
    w = rnd(*v.shape)
    (v * w.to(dtype)).sum().backward()
    (rv * w).sum().backward()
    for m, r_ in zip(mine, ref):
        torch.testing.assert_close(m.grad.double(), r_.grad, **tol)


def test_samples_per_chunk_rule(monkeypatch):
    """A CPU cache's worth of samples (CHUNK_BYTES of tokens, at least one sample); the whole batch on another
    device or for a grid group with more than 2 T query heads."""
    x = torch.empty(1000, 10, 16)
    assert pool_module.CHUNK_BYTES == 4 << 20
    assert pool_module._samples_per_chunk(x, 20) == (4 << 20) // (10 * 16 * 4)  # 6553 samples
    assert pool_module._samples_per_chunk(x.double(), 20) == (4 << 20) // (10 * 16 * 8)
    assert pool_module._samples_per_chunk(x, 21) == 1000
    assert pool_module._samples_per_chunk(torch.empty(1000, 10, 16, device="meta"), 4) == 1000
    monkeypatch.setattr(pool_module, "CHUNK_BYTES", 1000)
    assert pool_module._samples_per_chunk(x, 4) == 1  # less than one sample's tokens: still one sample
    monkeypatch.setattr(pool_module, "CHUNK_BYTES", 3 * 640 + 5)
    assert pool_module._samples_per_chunk(x, 4) == 3


# ------------------------------------------------------------------------------------------ pairing and labels
from alfcache.format import StoreError, check_labels  # noqa: E402
from probes import FeatureSet  # noqa: E402
from probes.features import check_compatible  # noqa: E402


def _fs(meta, L=2, D=4, path=None):
    x = np.zeros((6, L, D), np.float32)
    return FeatureSet(x, x, np.arange(6) % 2, ["a", "b"], [f"l{i}" for i in range(L)], None, meta, path)


def test_pairing_names_every_difference_and_treats_a_missing_key_as_a_difference():
    base = {"model": {"source_id": "timm:a", "fingerprint": "f"}, "dtype": "float16", "class_names": ["a", "b"]}
    check_compatible(_fs(base), _fs(dict(base)))
    check_compatible(_fs({}), _fs({}))  # no identity recorded on either side: nothing to compare
    # the same preprocessing recorded with its keys in another order is the same preprocessing
    check_compatible(_fs({**base, "preprocessing": {"resize": 248, "crop": 224, "mean": [0.5, 0.4]}}),
                     _fs({**base, "preprocessing": {"mean": [0.5, 0.4], "crop": 224, "resize": 248}}))
    with pytest.raises(ProbeError) as e:
        check_compatible(_fs(base), _fs({**base, "dtype": None}))  # recorded on one side only
    assert str(e.value) == "train and test features do not fit together: dtype differ"
    other = {**base, "model": {"source_id": "timm:b", "fingerprint": "f"}, "class_names": ["b", "a"]}
    with pytest.raises(ProbeError) as e:
        check_compatible(_fs(base, path="tr.zarr"), _fs(other, path="te.zarr"))
    assert str(e.value) == ("train and test features do not fit together: model, class names differ "
                            "('tr.zarr' vs 'te.zarr')")


def test_pairing_compares_the_token_shape_itself():
    """Arrays of another depth or width are refused even where no metadata records it; named once."""
    with pytest.raises(ProbeError, match=r"together: token shape differ$"):
        check_compatible(_fs({}, L=2), _fs({}, L=3))
    with pytest.raises(ProbeError, match=r"together: token shape differ$"):
        check_compatible(_fs({}, D=4), _fs({}, D=5))
    with pytest.raises(ProbeError, match=r"together: layers differ$"):
        check_compatible(_fs({"num_layers": 2}, L=2), _fs({"num_layers": 3}, L=3))


def test_labels_rule_by_hand():
    meta = {"class_names": ["a", "b", "c"]}
    check_labels(np.array([0, 2, -1, 1]), meta)  # -1: a skipped image (not complete: not counted)
    for bad, rows in (([0, 3, 1], [1]), ([-2, 0], [0]), ([5] * 7, [0, 1, 2, 3, 4])):
        with pytest.raises(StoreError) as e:
            check_labels(np.array(bad), meta, "s.zarr")
        assert str(e.value) == (f"store 's.zarr' is damaged: labels hold values outside its 3 classes (rows {rows}: "
                                f"{[bad[r] for r in rows]}); re-extract it with --overwrite")
    with pytest.raises(StoreError, match=r"^features are damaged: labels hold values outside its 0 classes"):
        check_labels(np.array([0]), {})
    done = {**meta, "complete": True, "skipped": [{"id": "x"}]}
    check_labels(np.array([0, -1, 2]), done)
    with pytest.raises(StoreError, match=r"2 rows labelled -1 \(skipped\) but it records 1 skipped image;"):
        check_labels(np.array([-1, -1, 2]), done, "s.zarr")
    with pytest.raises(StoreError, match=r"0 rows labelled -1 \(skipped\) but it records 2 skipped images;"):
        check_labels(np.array([0, 1]), {**done, "skipped": ["x", "y"]}, "s.zarr")
    check_labels(np.array([-1, -1, 2]), {**done, "complete": False})


def test_metadata_lookup_and_differences():
    from alfcache.format import differing, get

    meta = {"model": {"source_id": "timm:a", "cfg": {"img": 224}}, "dtype": "float16", "n": 0, "flag": False}
    assert get(meta, "model.cfg.img") == 224 and get(meta, "dtype") == "float16"
    assert get(meta, "n") == 0 and get(meta, "flag") is False  # falsy values are values, not "missing"
    assert get(meta, "model.name") is None and get(meta, "nothing.at.all") is None
    assert get(meta, "dtype.x") is None  # through a non-dict
    other = {"model": {"cfg": {"img": 224}, "source_id": "timm:b"}, "dtype": "float16", "n": 0}
    keys = ["dtype", "model.cfg", "model.source_id", "n", "flag", "absent"]
    assert differing(meta, other, keys) == ["model.source_id", "flag"]  # key order inside a dict does not count
    assert differing(meta, meta, keys) == []
