"""The paper protocol, fact by fact, pinned without the authors' code (docs/REPRODUCING.md gives their lines):
batch sizes and step counts, the authors' attention module (LayerNorm eps, dropout placement, init order),
plain linear probes, validation noise, selection order, narrower tokens zero-padded, all-token normalisation."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from probes import HEADS, PROTOCOLS, FeatureSet, TokenSpec, fit, resolve_protocol
from probes.attention import AttentionHead
from probes.protocol import authors_batch_size
from probes.train import predict_logits

PAPER = PROTOCOLS["paper"]

# N -> (batch size on all of train, batch size while choosing on the 80% part, steps choosing, steps final),
# worked out by hand from the rule (a batch of 2048 unless an epoch would have < 5 batches or a final batch under
# half a batch; then the largest size from N // k + 1 down that gives k = max(5, N // 2048) full batches and such
# a final batch; +1 while choosing when the 80% part would leave a batch of one; whole epochs: 40, or as many
# as reach 1000 steps). E.g. 1347: 5 x 244 = 1220, final batch 127 >= 122; 269..245 leave less than half.
TABLE = {
    1347: (244, 244, 1000, 1002),  # 1077 = 4 x 244 + 101: 5 batches x 200 epochs; 1347: 6 batches x 167 epochs
    2400: (480, 480, 1000, 1000),
    3000: (600, 600, 1000, 1000),
    5000: (1000, 1000, 1000, 1000),
    10000: (2000, 2000, 1000, 1000),
    50000: (2040, 2040, 1000, 1000),  # 24 full batches of 2048 leave 848 < 1024: 24 x 2040 + 1040
    14342: (1912, 1913, 1002, 1000),  # 11473 = 6 x 1912 + 1: the choosing batch grows by one
}


@pytest.mark.parametrize("n", sorted(TABLE))
def test_batch_sizes_and_steps_equal_the_authors(n):
    n_part = n - math.ceil(0.2 * n)  # sklearn's train_test_split(test_size=0.2) keeps this many for training
    got = (PAPER.batch_size_for(n), PAPER.tuning_batch_size(n, n_part), PAPER.steps(n_part, PAPER.tuning_batch_size(n, n_part)),
           PAPER.steps(n, PAPER.batch_size_for(n)))
    assert got == TABLE[n]
    b = got[0]
    assert n // b >= 5 and (n % b == 0 or n % b >= b / 2)  # what the rule promises
    assert PAPER.steps(n, b) % math.ceil(n / b) == 0  # whole epochs


def test_batch_rule_small_cases():
    assert authors_batch_size(2048, 1000) == 200
    assert authors_batch_size(256, 1200) == 240
    assert authors_batch_size(2048, 60) == 1  # no candidate above 16 gives 5 batches: the authors fall back to 1
    assert authors_batch_size(100, 1000) == 100


class TextbookAttentiveProbe(nn.Module):
    """The authors' AttentiveProbeModel as their paper runs configure it, written out independently: LayerNorms
    on query/key/value inputs with torch's defaults, bias-free q/k/v, head dim 2 * (D // H), attention dropout p
    and projection dropout 0, output projection, BatchNorm1d (affine), Linear; query N(0, .02), drawn last."""

    def __init__(self, D, H, C, p=0.0):
        super().__init__()
        self.H, hd = H, 2 * (D // H)
        self.norm_q, self.norm_k, self.norm_v = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.k, self.v = (nn.Linear(D, H * hd, bias=False) for _ in range(3))
        self.attn_drop = nn.Dropout(p)
        self.proj = nn.Linear(H * hd, D)
        self.bn = nn.BatchNorm1d(D)
        self.classifier = nn.Linear(D, C)
        self.query = nn.Parameter(torch.zeros(1, 1, D))
        nn.init.normal_(self.query, std=0.02)
        self.scale = hd ** -0.5

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(self.norm_q(self.query.expand(B, -1, -1))).view(B, 1, self.H, -1).transpose(1, 2)
        k = self.k(self.norm_k(x)).view(B, T, self.H, -1).transpose(1, 2)
        v = self.v(self.norm_v(x)).view(B, T, self.H, -1).transpose(1, 2)
        a = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(-1))
        out = self.proj((a @ v).transpose(1, 2).reshape(B, -1))
        return self.classifier(self.bn(out))


def copy_textbook(ref: TextbookAttentiveProbe, ours: AttentionHead) -> None:
    with torch.no_grad():
        for n in "qkv":
            getattr(ours, f"ln_{n}_weight")[0] = getattr(ref, f"norm_{n}").weight
            getattr(ours, f"ln_{n}_bias")[0] = getattr(ref, f"norm_{n}").bias
            getattr(ours, f"w_{n}")[0] = getattr(ref, n).weight.t()
        ours.proj_weight[0], ours.proj_bias[0] = ref.proj.weight.t(), ref.proj.bias
        ours.classifier.linear.weight[0], ours.classifier.linear.bias[0] = ref.classifier.weight.t(), ref.classifier.bias
        ours.classifier.bn.weight[0], ours.classifier.bn.bias[0] = ref.bn.weight, ref.bn.bias
        ours.query[0] = ref.query.view(-1)


@pytest.mark.parametrize("D,T,C", [(768, 24, 100), (64, 8, 5)])
def test_attention_head_equals_the_authors_module(D, T, C):
    """Same seed -> the same initial weights (their draw order); with weights copied, the same logits to 1e-5
    (train and eval mode: LayerNorm eps 1e-5, BatchNorm and its running statistics alike)."""
    torch.manual_seed(7)
    ref = TextbookAttentiveProbe(D, T, C)
    torch.manual_seed(7)
    ours = AttentionHead(1, T, D, C, num_heads=T)
    assert ours.eps == 1e-5
    torch.testing.assert_close(ours.w_k[0], ref.k.weight.t(), rtol=0, atol=0)
    torch.testing.assert_close(ours.query[0], ref.query.view(-1), rtol=0, atol=0)
    torch.testing.assert_close(ours.classifier.linear.weight[0], ref.classifier.weight.t(), rtol=0, atol=0)
    with torch.no_grad():  # move every parameter away from its initial value
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    copy_textbook(ref, ours)
    x = torch.randn(64, T, D)
    for mode in ("train", "eval"):
        ref.train(mode == "train"), ours.train(mode == "train")
        with torch.no_grad():
            a, b = ref(x), ours(x)[0]
        assert (a - b).abs().max() < 1e-5, (mode, float((a - b).abs().max()))
    torch.testing.assert_close(ours.classifier.bn.running_var[0], ref.bn.running_var, rtol=1e-5, atol=1e-6)


def test_dropout_only_on_attention_weights():
    """A probe with p > 0 drops attention weights (kept ones scaled by 1 / (1 - p), as nn.Dropout) and nothing
    else: its training forward equals the authors' module whose attention dropout drops the same weights, with
    no dropout on the pool's output."""
    D, T, C, p = 32, 6, 3, 0.5
    torch.manual_seed(0)
    ref = TextbookAttentiveProbe(D, T, C, p)
    ours = AttentionHead(2, T, D, C, num_heads=T, dropout=torch.tensor([0.0, p]))
    copy_textbook(ref, ours)
    with torch.no_grad():
        for prm in ours.parameters():
            prm[1] = prm[0]
    draws = torch.rand(10, T, T)  # (B, H, T)
    keep = (draws >= p).float().unsqueeze(2)  # the textbook attention is (B, H, 1, T)

    class FixedDropout(nn.Module):
        def forward(self, a):
            return a * keep / (1 - p)

    ref.attn_drop = FixedDropout()
    ref.train(), ours.train()
    x = torch.randn(10, T, D)
    with torch.no_grad():
        got, want = ours(x, draws=draws), ref(x)
    torch.testing.assert_close(got[1], want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[0], got[1])  # configuration 0 (p = 0) dropped nothing
    assert HEADS["alf"].uses_dropout and not HEADS["linear"].uses_dropout


def test_selection_order_and_grid():
    configs = PAPER.configs(with_dropout=True)
    assert len(configs) == 63 and configs[0] == {"lr": 0.1, "wd": 1e-6, "dropout": 0.0}
    assert [c["dropout"] for c in configs[::21]] == [0.0, 0.1, 0.3]  # dropout runs outermost, then lr, then wd
    assert [c["wd"] for c in configs[:7]] == pytest.approx(list(np.logspace(-6, 0, 7)))
    assert len(PAPER.configs(with_dropout=False)) == 21


def _projected_set(n=40, L=3, D=8, E=5, seed=0):
    rng = np.random.default_rng(seed)
    cls, ap = rng.standard_normal((n, L, D)), rng.standard_normal((n, L, D))
    patches = rng.standard_normal((n, 4, D))
    w, b = rng.standard_normal((E, D)), rng.standard_normal(E)
    fs = FeatureSet.from_arrays(cls=cls, ap=ap, patches=patches, labels=np.arange(n) % 2, projection=(w, b))
    return fs, cls, ap, patches, w, b


def test_projected_last_layer_is_zero_padded_to_the_model_width():
    """CLIP's final layer as the authors take it (projection of ln_post), narrower than the other layers: each
    token L2-normalised, then zero-padded on the right to the model's width; linear heads read only the real
    columns; the all-tokens head keeps the projected width and normalises each channel over the tokens."""
    fs, cls, ap, patches, w, b = _projected_set()
    rows = np.array([3, 1])
    alf = fs.tokens(rows, HEADS["alf"].token_spec(PAPER))
    layout = fs.layout(HEADS["alf"].token_spec(PAPER))
    assert alf.shape == (2, 6, 8) and layout.widths == [8, 8, 8, 8, 5, 5] and layout.width == 8
    proj_cls = cls[rows, 2] @ w.T + b
    np.testing.assert_allclose(alf[:, 4, :5], proj_cls / np.linalg.norm(proj_cls, axis=1, keepdims=True), rtol=1e-5)
    assert not alf[:, 4:, 5:].any()  # padding
    np.testing.assert_allclose(alf[:, 0], cls[rows, 0] / np.linalg.norm(cls[rows, 0], axis=1, keepdims=True), rtol=1e-5)
    lin = HEADS["concat"].token_spec(PAPER)
    assert fs.layout(lin).features == 4 * 8 + 2 * 5
    assert HEADS["concat"].build(1, fs.layout(lin), 2, torch.zeros(1)).linear.weight.shape == (1, 42, 2)
    last = fs.tokens(rows, HEADS["alf:last"].token_spec(PAPER))
    assert last.shape == (2, 2, 8)  # padded to the model width even when every token is projected (the authors)
    # the all-tokens head: projected CLS + projected patches, width 5, channels normalised across the 5 tokens
    spec = HEADS["attentive"].token_spec(PAPER)
    at = fs.tokens(rows, spec)
    raw = np.concatenate([cls[rows, 2:3], patches[rows]], axis=1) @ w.T + b
    np.testing.assert_allclose(at, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    clean = fs.tokens(rows, HEADS["attentive"].token_spec(PROTOCOLS["clean"]))
    np.testing.assert_allclose(np.linalg.norm(clean, axis=-1), 1.0, rtol=1e-5)
    norm = fs.tokens(rows, TokenSpec("last", "cls", final="norm"))  # the unprojected final norm stays available
    assert norm.shape == (2, 1, 8)


def test_validation_features_get_the_training_noise():
    """Paper: validation on noisy features (one draw from the seed, the same for every configuration); clean:
    on clean features."""
    rng = np.random.default_rng(0)
    y = np.arange(300) % 3
    cls = rng.standard_normal((300, 2, 16)) + 0.3 * np.eye(16)[y][:, None]
    fs = FeatureSet.from_arrays(cls=cls, ap=cls, labels=y)
    small = dict(lr=(1e-1, 1e-2), wd=(1e-4,), epochs=2, min_steps=20, noise_std=0.5)
    paper = fit(fs, "linear", protocol={"base": "paper", **small}, progress=False)
    clean = fit(fs, "linear", protocol={"base": "clean", **small}, progress=False)
    assert paper.record["validation_noise"] is True and clean.record["validation_noise"] is False
    spec, proto, cpu = HEADS["linear"].token_spec(PAPER), resolve_protocol({"base": "paper", **small}), torch.device("cpu")
    rows = fs.rows[:50]
    noisy = predict_logits(paper.module, fs, rows, spec, cpu, noise=(proto, 0))[0]
    again = predict_logits(paper.module, fs, rows, spec, cpu, noise=(proto, 0))[0]
    plain = predict_logits(paper.module, fs, rows, spec, cpu)[0]
    np.testing.assert_array_equal(noisy, again)
    assert not np.allclose(noisy, plain)
    # the choice differs only through validation: both retrain the chosen config the same way
    assert paper.record["n_val"] == clean.record["n_val"] == 60


def test_record_names_batches_steps_and_protocol():
    rng = np.random.default_rng(1)
    y = np.arange(1347) % 3
    fs = FeatureSet.from_arrays(cls=rng.standard_normal((1347, 2, 8)) + np.eye(8)[y][:, None], labels=y)
    p = fit(fs, "linear", protocol={"base": "paper", "lr": (0.1,), "wd": (1e-4,), "min_steps": 10, "epochs": 1},
            progress=False)
    r = p.record
    assert (r["batch_size"], r["batch_size_grid"]) == (244, 244)  # the authors' rule at N = 1347
    assert (r["steps_grid"], r["steps_final"]) == (10, 12)  # whole epochs: 5 batches x 2, 6 batches x 2
    assert r["protocol"]["name"] == "paper+custom" and r["params"] == 8 * 3 + 3  # nn.Linear, no BatchNorm
