"""Probe stage on real computations: planted signal, parameter formulas, factored attention,
one-pass grid == training alone, optimiser == torch's, class weights, save/load."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score

from probes import HEADS, FeatureSet, FittedProbe, Protocol, TokenSpec, fit, pool, resolve_layers
from probes.attention import AttentionHead, pool_parameters_formula
from probes.batches import BatchStream
from probes.layers import LinearHead, count_parameters
from probes.loss import class_weights, weighted_cross_entropy
from probes.optim import BatchedAdamW, cosine_lr
from probes.train import predict_logits, train_configs

QUICK = Protocol(name="test", lr=(1e-1, 1e-2), wd=(1e-4,), dropout=(0.0,), epochs=10, min_steps=150, batch_size=256,
                 val_noise=False)


def planted(n, L=6, D=32, C=4, layer=2, seed=0, imbalance=False):
    """Label lives only in one intermediate layer's AP token; everything else is noise."""
    rng = np.random.default_rng(seed)
    p = np.array([0.55, 0.25, 0.12, 0.08]) if imbalance else None
    y = rng.choice(C, size=n, p=p)
    cls = rng.standard_normal((n, L, D)).astype(np.float32)
    ap = rng.standard_normal((n, L, D)).astype(np.float32)
    centers = np.random.default_rng(99).standard_normal((C, D))
    ap[:, layer] += 1.5 * centers[y]
    return cls, ap, y


@pytest.fixture(scope="module")
def planted_sets():
    cls, ap, y = planted(1600)
    mk = lambda r: FeatureSet.from_arrays(cls=cls[r], ap=ap[r], labels=y[r])
    return mk(np.arange(1200)), mk(np.arange(1200, 1600))


def test_alf_finds_planted_intermediate_ap_token(planted_sets):
    train, test = planted_sets
    alf = fit(train, "alf", grid=QUICK, progress=False)
    lin = fit(train, "linear", grid=QUICK, progress=False)
    assert alf.balanced_accuracy(test) >= 95.0
    assert lin.balanced_accuracy(test) < 40.0  # chance is 25%
    att = alf.attention(test)  # (N, H, T)
    assert att.shape == (400, 12, 12)
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)
    mean = att.mean(axis=(0, 1))
    names = alf.token_names
    assert names[int(mean.argmax())] == "layer3:ap"
    assert mean.max() > 3 * np.delete(mean, mean.argmax()).max()


def test_token_selection_layers_and_interleaving():
    assert resolve_layers(12, "quarterly") == [2, 5, 8, 11]
    assert resolve_layers(12, "middle+last") == [5, 11]
    assert resolve_layers(24, "quarterly") == [5, 11, 17, 23]
    assert resolve_layers(12, "0,-1") == [0, 11]
    cls = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) + 1
    fs = FeatureSet.from_arrays(cls=cls, ap=-cls, labels=[0, 1])
    x = fs.tokens(np.array([1, 0]), TokenSpec("all", "cls+ap", normalise="none"))
    np.testing.assert_array_equal(x[0, 0], cls[1, 0])  # [CLS_1, AP_1, CLS_2, ...]
    np.testing.assert_array_equal(x[0, 1], -cls[1, 0])
    np.testing.assert_array_equal(x[1, 4], cls[0, 2])
    xn = fs.tokens(np.array([0, 1]), TokenSpec("last", "cls"))
    np.testing.assert_allclose(np.linalg.norm(xn, axis=-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("D,T,backbone_params,paper_share", [(768, 24, 86.57e6, 0.055), (1024, 48, 304.33e6, 0.027)])
def test_parameter_counts_match_spec(D, T, backbone_params, paper_share):
    head = AttentionHead(1, T, D, 10, num_heads=T)
    hd = 2 * (D // T)
    assert head.head_dim == hd
    pool = count_parameters(head) - count_parameters(head.classifier)
    assert pool == pool_parameters_formula(D, T)
    assert pool == D + 6 * D + 3 * D * T * hd + T * hd * D + D
    assert count_parameters(head.classifier) == 2 * D + D * 10 + 10
    assert abs(pool / backbone_params - paper_share) < 0.002  # ~5.5% of ViT-B, ~2.7% of ViT-L
    lin = LinearHead(1, torch.arange(T * D), 10)
    assert count_parameters(lin) == T * D * 10 + 10  # the authors' linear probe: nn.Linear, no BatchNorm


@pytest.mark.parametrize("chunk_bytes", [pool.CHUNK_BYTES, 1, 3 * 7 * 24 * 4])  # one chunk, one sample, 3 + 2
def test_factored_attention_equals_direct_order(chunk_bytes, monkeypatch):
    """Outputs, every parameter's gradient (the factored backward is written out) and the attention weights equal
    the textbook order's, whether the forward takes the batch whole or a few samples at a time."""
    monkeypatch.setattr(pool, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    G, B, T, D, C = 3, 5, 7, 24, 4
    head = AttentionHead(G, T, D, C, num_heads=4, dropout=torch.tensor([0.0, 0.1, 0.3]))
    with torch.no_grad():  # make the per-config LayerNorm affines differ
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(B, T, D)
    drop = torch.rand(B, 4, T)
    head.train()
    outs = []
    for fwd in (head.forward, head.forward_direct):
        head.zero_grad()
        y = fwd(x, slice(None), drop)
        y.square().sum().backward()
        # ln_k's bias only adds a per-head constant to the logits, which softmax cancels: its gradient
        # is exactly zero, and the factored order does not even touch it (None)
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in head.parameters()]
        outs.append((y.detach(), grads, head.last_attention()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0][2], outs[1][2], rtol=1e-4, atol=1e-6)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("head", ["linear-clsap", "alf"])
def test_grid_in_one_pass_equals_each_config_alone(head):
    cls, ap, y = planted(300, L=3, D=16, seed=1)
    fs = FeatureSet.from_arrays(cls=cls, ap=ap, labels=y)
    spec = HEADS[head]
    grid = Protocol(epochs=3, min_steps=40, batch_size=64)
    tokens = spec.token_spec(grid)
    configs = [{"lr": 1e-2, "wd": 1e-4, "dropout": 0.0}, {"lr": 1e-3, "wd": 1e-1, "dropout": 0.1},
               {"lr": 1e-1, "wd": 1e-6, "dropout": 0.3}]
    rows = fs.rows
    run = dict(batch_size=60, seed=3, device=torch.device("cpu"), progress=False)
    together, _ = train_configs(fs, rows, spec, tokens, configs, grid, group_size=2, **run)  # two groups per step
    lt, _ = predict_logits(together, fs, rows, tokens, torch.device("cpu"))
    # (the attention pool's BatchNorm-cancelled biases get no rounding-noise steps: zero_cancelled_grads)
    for i, c in enumerate(configs):
        alone, _ = train_configs(fs, rows, spec, tokens, [c], grid, **run)
        la, _ = predict_logits(alone, fs, rows, tokens, torch.device("cpu"))
        np.testing.assert_allclose(lt[i], la[0], rtol=1e-3, atol=1e-3)
        assert (lt[i].argmax(-1) == la[0].argmax(-1)).mean() >= 0.99
        for (name, pt), (_, pa) in zip(together.state_dict().items(), alone.state_dict().items()):
            if pt.dim() and pt.shape[0] == len(configs):
                torch.testing.assert_close(pt[i], pa[0], rtol=1e-3, atol=1e-4, msg=name)


def test_batched_adamw_and_clipping_equal_torch():
    torch.manual_seed(0)
    lrs, wds = torch.tensor([1e-1, 1e-2]), torch.tensor([1e-2, 0.5])
    W = torch.nn.Parameter(torch.randn(2, 5, 3))
    refs = [torch.nn.Parameter(W.detach()[g].clone()) for g in range(2)]
    ours = BatchedAdamW([W], lrs, wds)
    theirs = [torch.optim.AdamW([refs[g]], lr=float(lrs[g]), weight_decay=float(wds[g])) for g in range(2)]
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=1e-6) for o in theirs]
    for step in range(10):
        grad = torch.randn(2, 5, 3) * 10
        ours.zero_grad()
        W.grad = grad.clone()
        ours.clip_grad_norm(5.0)
        ours.step(cosine_lr(lrs, step, 10, 1e-6))
        for g in range(2):
            theirs[g].zero_grad()
            refs[g].grad = grad[g].clone()
            torch.nn.utils.clip_grad_norm_([refs[g]], 5.0)
            theirs[g].step()
            scheds[g].step()
    for g in range(2):
        torch.testing.assert_close(W.detach()[g], refs[g].detach(), rtol=1e-5, atol=1e-6)


def test_batched_adamw_through_backward_equals_torch():
    """The optimiser keeps parameters and gradients in flat buffers: training a batched head through real
    backward passes equals torch.optim.AdamW + clip_grad_norm_ on each configuration's own copy."""
    torch.manual_seed(0)
    lrs, wds = torch.tensor([1e-1, 1e-3]), torch.tensor([1e-4, 1e-1])
    head = LinearHead(2, torch.arange(12), 3)
    head.train()
    refs = [LinearHead(1, torch.arange(12), 3) for _ in range(2)]
    for g, r in enumerate(refs):
        r.load_state_dict({k: v[g:g + 1].clone() for k, v in head.state_dict().items()})
        r.train()
    ours = BatchedAdamW(head.parameters(), lrs, wds)
    theirs = [torch.optim.AdamW(r.parameters(), lr=float(lrs[g]), weight_decay=float(wds[g])) for g, r in enumerate(refs)]
    w = torch.ones(3)
    for step in range(5):
        x, y = torch.randn(16, 2, 6), torch.randint(0, 3, (16,))
        ours.zero_grad()
        with torch.autograd.enforce_grad_layout_policy(False):
            weighted_cross_entropy(head(x), y, w).sum().backward()
        ours.clip_grad_norm(0.5)
        ours.step(lrs)
        for g, r in enumerate(refs):
            theirs[g].zero_grad()
            weighted_cross_entropy(r(x), y, w).sum().backward()
            torch.nn.utils.clip_grad_norm_(r.parameters(), 0.5)
            theirs[g].step()
    assert all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(ours.params, ours.views))  # no copies made
    for g, r in enumerate(refs):
        for (name, p), (_, q) in zip(head.state_dict().items(), r.state_dict().items()):
            torch.testing.assert_close(p[g], q[0], rtol=1e-5, atol=1e-6, msg=name)


def test_class_weighted_loss():
    y = np.array([0] * 6 + [1] * 3 + [2])
    w = class_weights(y, 4)
    np.testing.assert_allclose(w[:3].numpy(), [10 / 18, 10 / 9, 10 / 3], rtol=1e-6)
    assert w[3] == 0  # a class absent from training
    yt = torch.from_numpy(y)
    # ordinary and confident logits (most exp arguments underflow), row-major and class-major layouts
    for scale in (1.0, 200.0):
        base = torch.randn(2, 4, 10) * scale
        for logits in (base.transpose(1, 2).contiguous(), base.transpose(1, 2)):
            lg = logits.clone().requires_grad_() if logits.is_contiguous() else logits.detach().requires_grad_()
            ours = weighted_cross_entropy(lg, yt, w)
            (ours * torch.tensor([1.0, -2.0])).sum().backward()
            ref = logits.detach().clone().requires_grad_()
            theirs = torch.stack([F.cross_entropy(ref[g], yt, weight=w) for g in range(2)])
            (theirs * torch.tensor([1.0, -2.0])).sum().backward()
            torch.testing.assert_close(ours, theirs)
            torch.testing.assert_close(lg.grad, ref.grad)


def test_weighted_training_helps_minority_classes():
    cls, ap, y = planted(1200, seed=2, imbalance=True)
    mk = lambda r: FeatureSet.from_arrays(cls=cls[r], ap=ap[r], labels=y[r])
    probe = fit(mk(np.arange(900)), "concat", grid=QUICK, progress=False)
    test = mk(np.arange(900, 1200))
    pred = probe.predict(test)
    assert probe.balanced_accuracy(test) == pytest.approx(100 * balanced_accuracy_score(y[900:], pred))
    recalls = [(pred[y[900:] == c] == c).mean() for c in range(4)]
    assert min(recalls) > 0.6, recalls


def test_record_save_load_roundtrip(planted_sets, tmp_path):
    train, test = planted_sets
    probe = fit(train, "alf", grid=QUICK, progress=False, seed=5)
    r = probe.record
    assert r["n_val"] == 240 and r["n_train"] == 960 and len(r["grid_results"]) == 2
    assert r["chosen"] in [{k: g[k] for k in ("lr", "wd", "dropout")} for g in r["grid_results"]]
    assert r["params"] == probe.num_parameters and r["seed"] == 5
    probe.save(tmp_path / "alf")
    back = FittedProbe.load(tmp_path / "alf")
    np.testing.assert_allclose(back.logits(test), probe.logits(test), rtol=1e-5, atol=1e-5)
    # deterministic for a seed
    again = fit(train, "alf", grid=QUICK, progress=False, seed=5)
    np.testing.assert_allclose(again.logits(test), probe.logits(test), rtol=1e-5, atol=1e-5)


def test_streaming_batches_match_in_memory_set(planted_sets):
    """Training from chunk-streamed reads (store bigger than RAM) reaches the same quality."""
    base, test = planted_sets
    train = FeatureSet(base.cls, base.ap, base.labels, base.class_names, base.layer_names, meta=base.meta,
                       chunk_rows=100)  # a copy: the module-scoped fixture stays as it was
    s = BatchStream(train, train.rows, TokenSpec("all", "cls+ap"), 256, seed=0, in_memory=False)
    it = iter(s)
    batches = [next(it) for _ in range(5)]  # first epoch: 1200 rows in batches of 256
    assert [len(b[1]) for b in batches] == [256, 256, 256, 256, 176]
    seen = np.concatenate([b[1] for b in batches])
    assert len(seen) == 1200 and sorted(np.bincount(seen)) == sorted(np.bincount(train.labels))
    # every row exactly once, with the tokens the in-memory reader gives it
    streamed = np.concatenate([b[0] for b in batches]).reshape(1200, -1)
    ref = train.tokens(train.rows, TokenSpec("all", "cls+ap")).reshape(1200, -1)
    key = lambda a: a[np.lexsort(a[:, :4].T)]  # noqa: E731
    np.testing.assert_array_equal(key(streamed), key(ref))
    # later epochs read into the same two window buffers while batches of the previous window are in use
    for _ in range(2):
        again = [next(it) for _ in range(5)]
        assert [len(b[1]) for b in again] == [256, 256, 256, 256, 176]
        np.testing.assert_array_equal(key(np.concatenate([b[0] for b in again]).reshape(1200, -1)), key(ref))
    buf = np.empty((1300, len(train.token_names(TokenSpec("all", "cls+ap"))), train.width), np.float32)
    got = train.tokens(train.rows[:1000], TokenSpec("all", "cls+ap"), out=buf)
    assert np.shares_memory(got, buf) and np.array_equal(got.reshape(1000, -1), ref[:1000])
    lin = fit(train, "alf", grid=QUICK, progress=False, in_memory=False)
    assert lin.balanced_accuracy(test) >= 95.0


def test_linear_grid_equals_plain_linear_per_config():
    """The linear grid is one matrix product for every configuration; each slice is an nn.Linear on the real
    (unpadded) columns of the concatenated tokens."""
    torch.manual_seed(0)
    valid = torch.tensor([0, 1, 2, 5, 6])  # token 0 has 3 real columns, token 1 two (padded width 5)
    head = LinearHead(3, valid, 4)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(16, 2, 5)
    out = head(x)
    flat = x.reshape(16, -1)[:, valid]
    for g in range(3):
        ref = flat @ head.linear.weight[g] + head.linear.bias[g]
        torch.testing.assert_close(out[g], ref, rtol=1e-5, atol=1e-5)


def test_layer_and_kind_override(planted_sets, tmp_path):
    train, test = planted_sets
    p = fit(train, "alf", grid=QUICK, layers=[2, -1], kinds="ap", progress=False)
    assert p.token_names == ["layer3:ap", "layer6:ap"] and p.module.num_heads == 2
    assert p.balanced_accuracy(test) >= 95.0  # layer 3's AP carries the label
    p.save(tmp_path / "custom")
    back = FittedProbe.load(tmp_path / "custom")
    assert back.token_names == p.token_names
    np.testing.assert_allclose(back.logits(test), p.logits(test), rtol=1e-5, atol=1e-5)


def test_standardised_linear_head_does_not_depend_on_a_common_component():
    """Tokens dominated by one direction shared by every image (1000x the class signal, as a random or poorly
    conditioned model gives): after L2 normalisation the class signal is ~3e-4 per dimension. The plain `linear`
    head (the authors' nn.Linear) cannot reach it in the grid's steps; `linear-bn` (BatchNorm -> Linear, the
    paper's prose) standardises it away and separates the classes."""
    rng = np.random.default_rng(0)
    n, D, K = 900, 32, 3
    y = np.arange(n) % K
    common = rng.standard_normal(D)
    x = (1000 * common / np.linalg.norm(common) + 0.3 * np.eye(D)[y] + 0.15 * rng.standard_normal((n, D)))
    cls = x[:, None, :].astype(np.float32)
    train, test = (FeatureSet.from_arrays(cls=cls[r], labels=y[r]) for r in (slice(0, 600), slice(600, None)))
    grid = {"base": "quick", "noise_p": 0.0}
    plain, bn = (fit(train, h, protocol=grid, progress=False) for h in ("linear", "linear-bn"))
    acc_plain, acc_bn = plain.balanced_accuracy(test), bn.balanced_accuracy(test)
    assert acc_bn >= 75 and acc_bn - acc_plain >= 30, (acc_plain, acc_bn)
    assert count_parameters(bn.module) == count_parameters(plain.module) + 2 * D  # + BatchNorm weight and bias
