"""Guarantees the README and docs/REPRODUCING.md state, each pinned by a test that fails when its code is broken
(each one was checked by breaking the code once; see docs/MUTATION.md): every key of the pairing identity, whole
files under failure, every non-finite value, the authors' batch rule on every size, LayerNorm eps where it
matters, both stores of a pair verified, per-configuration gradient clipping in the one-pass grid."""
import json
import math
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from alfcache.format import PAIR_KEYS, StoreError, write_atomic
from probes import FeatureSet, Protocol
from probes.errors import ProbeError
from probes.features import check_compatible

# ------------------------------------------------------------------------------------------ pairing identity
# What makes a train and a test store one pair, written out from the README ("Train and test stores are paired by
# identity - resolved dataset source and index fingerprint, model source and weights fingerprint, architecture,
# taps, dtype, class names, preprocessing, decoding, protocol, autocast") and the token shape: independent of
# PAIR_KEYS, so dropping a key there fails here.
IDENTITY = {
    "model.source_id": "timm:a", "model.fingerprint": "f00d", "model.architecture": "vit_small",
    "taps.modules": ["blocks.0.norm2", "norm"], "dtype": "float16", "preprocessing": {"resize": 248},
    "dataset.source": "imagefolder:/data/a", "dataset.index_fingerprint": "beef",
    "dataset.image_loading": {"exif": True}, "extraction.autocast": None, "extraction.protocol": "paper",
    "class_names": ["a", "b"], "width": 4, "num_layers": 2,
}
OTHER = {"model.source_id": "timm:b", "model.fingerprint": "cafe", "model.architecture": "vit_base",
         "taps.modules": ["blocks.1.norm2", "norm"], "dtype": "float32", "preprocessing": {"resize": 256},
         "dataset.source": "imagefolder:/data/b", "dataset.index_fingerprint": "d00d",
         "dataset.image_loading": {"exif": False}, "extraction.autocast": "bfloat16", "extraction.protocol": "clean",
         "class_names": ["b", "a"], "width": 5, "num_layers": 3}


def _nested(flat: dict) -> dict:
    out: dict = {}
    for dotted, v in flat.items():
        cur = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            cur = cur.setdefault(p, {})
        cur[leaf] = v
    return out


def _features(meta_flat: dict) -> FeatureSet:
    rng = np.random.default_rng(0)
    y = np.arange(8) % 2
    return FeatureSet.from_arrays(cls=rng.standard_normal((8, 2, 4)), labels=y, class_names=["a", "b"],
                                  meta=_nested(meta_flat))


@pytest.mark.parametrize("key", sorted(IDENTITY))
def test_every_identity_key_refuses_a_pair(key):
    """Two feature sets alike in everything but one identity key are refused, the message naming what differs;
    alike in everything they pair."""
    check_compatible(_features(IDENTITY), _features(IDENTITY))
    with pytest.raises(ProbeError, match="do not fit together"):
        check_compatible(_features(IDENTITY), _features({**IDENTITY, key: OTHER[key]}))
    assert key in dict(PAIR_KEYS), f"{key} is not part of the pairing identity"


# ------------------------------------------------------------------------------------------ whole files
def test_write_atomic_never_shows_a_torn_file(tmp_path, monkeypatch):
    """While the new content is written the old file stays whole (a reader sees it), and a write that fails
    (disk full at fsync, a kill) leaves the old file and no temporary beside it."""
    f = tmp_path / "summary.csv"
    f.write_text("old,whole\n")
    seen = []
    real_fsync = os.fsync

    def fsync_then_look(fd):
        seen.append((f.read_text(), os.path.samefile(f"/proc/self/fd/{fd}", f)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_then_look)
    write_atomic(f, "new,content,that,is,longer\n" * 100)
    assert seen == [("old,whole\n", False)], "the new bytes must be flushed to a file other than the target"
    assert f.read_text() == "new,content,that,is,longer\n" * 100

    for failure in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        def failing_fsync(fd, failure=failure):
            raise failure

        monkeypatch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(type(failure)):
            write_atomic(f, b"torn")
        assert f.read_text() == "new,content,that,is,longer\n" * 100
        assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]


# ------------------------------------------------------------------------------------------ non-finite tokens
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_every_non_finite_token_is_refused_before_writing(bad):
    from alfcache.errors import AlfError
    from alfcache.extract import check_tokens

    plan = SimpleNamespace(layer_names=["block0", "final_norm"])
    t = torch.zeros(3, 2, 4)
    check_tokens({"cls": t, "ap": t}, "float32", plan, ["a", "b", "c"])
    t = t.clone()
    t[1, 1, 2] = bad
    with pytest.raises(AlfError, match=r"non-finite ap token at layer final_norm for sample b"):
        check_tokens({"cls": torch.zeros(3, 2, 4), "ap": t}, "float32", plan, ["a", "b", "c"])
    fs = FeatureSet.from_arrays(cls=t.numpy(), labels=np.arange(3) % 2)
    from probes.selection import TokenSpec

    with pytest.raises(ProbeError, match=r"non-finite tokens in rows \[1\]"):
        fs.tokens(fs.rows, TokenSpec("all", "cls"))


def test_float16_overflow_is_refused():
    """A float32 token beyond float16's range would be stored as inf: refused when storing float16."""
    from alfcache.errors import AlfError
    from alfcache.extract import FP16_MAX, check_tokens

    assert FP16_MAX == float(torch.finfo(torch.float16).max)
    plan = SimpleNamespace(layer_names=["l0"])
    ok = torch.full((2, 1, 3), FP16_MAX)
    check_tokens({"cls": ok}, "float16", plan, ["a", "b"])
    big = ok.clone()
    big[0, 0, 0] = -7e4
    assert torch.isinf(big.half()).any()
    with pytest.raises(AlfError, match="beyond float16"):
        check_tokens({"cls": big}, "float16", plan, ["a", "b"])
    check_tokens({"cls": big}, "float32", plan, ["a", "b"])  # stored as float32 it is finite


# ------------------------------------------------------------------------------------------ the batch rule
def _their_adjust_batch_size(batch_size: int, num_samples: int, min_batches: int = 5) -> int:
    """lciernik/attentive-layer-fusion src/data/data_loader.py:22-73 (`adjust_batch_size`, commit ef86a87),
    transcribed line by line: the reference the published runs used."""
    def remainder_ok(remainder, batch_size):
        return remainder == 0 or remainder >= 0.5 * batch_size

    nr_batches = num_samples // batch_size
    remainder = num_samples % batch_size
    if nr_batches >= min_batches and remainder_ok(remainder, batch_size):
        return batch_size
    best_batch_size = 1
    if nr_batches >= min_batches:
        min_batches = nr_batches
    max_batch_size = (num_samples // min_batches) + 1
    for candidate_batch_size in range(max_batch_size, 16, -1):
        remainder = num_samples % candidate_batch_size
        nr_full_batches = num_samples // candidate_batch_size
        if nr_full_batches < min_batches:
            continue
        if remainder_ok(remainder, candidate_batch_size):
            best_batch_size = candidate_batch_size
            break
    return best_batch_size


def test_batch_rule_equals_the_authors_on_every_size():
    """Every training-set size from 2 to 20000 (the paper's protocol, batch 2048), and the quick grid's 256 and
    the tuning loaders' +1 on the 80% part, against their function."""
    from probes.protocol import PROTOCOLS, authors_batch_size

    paper = PROTOCOLS["paper"]
    bad = [n for n in range(2, 20001) if paper.batch_size_for(n) != _their_adjust_batch_size(2048, n)]
    assert not bad, f"{len(bad)} sizes differ, e.g. {bad[:5]}"
    bad = [n for n in range(2, 5001) if authors_batch_size(256, n) != _their_adjust_batch_size(256, n)]
    assert not bad, f"{len(bad)} sizes differ at batch 256, e.g. {bad[:5]}"
    for n in (1347, 2400, 9999, 14342):
        part = n - math.ceil(0.2 * n)
        b = _their_adjust_batch_size(2048, n)
        assert paper.tuning_batch_size(n, part) == (b + 1 if part % b == 1 else b)


# ------------------------------------------------------------------------------------------ LayerNorm eps
@pytest.mark.parametrize("scale", [1.0, 1e-2])
def test_attention_pool_eps_matters_and_matches_the_authors(scale):
    """On the tokens the probe really sees - L2-normalised, D=768, so each token's variance is ~1/768, close to
    eps - LayerNorm's eps 1e-5 changes the logits: ours (factored pool, forward and backward) must equal the
    authors' module with torch's default eps, and be told apart from eps 1e-6."""
    from probes.attention import AttentionHead
    from test_protocol import TextbookAttentiveProbe, copy_textbook

    D, T, C = 768, 12, 10
    torch.manual_seed(0)
    ref = TextbookAttentiveProbe(D, T, C)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = AttentionHead(1, T, D, C, num_heads=T)
    copy_textbook(ref, ours)
    x = torch.nn.functional.normalize(torch.randn(32, T, D) + 0.5, dim=-1) * scale
    ref.eval(), ours.eval()
    with torch.no_grad():
        a, b = ref(x), ours(x)[0]
    other = TextbookAttentiveProbe(D, T, C)
    other.load_state_dict(ref.state_dict())
    for ln in (other.norm_q, other.norm_k, other.norm_v):
        ln.eps = 1e-6
    other.eval()
    with torch.no_grad():
        gap = float((other(x) - a).abs().max())
    assert gap > 20 * 3e-5, f"inputs must be ones where eps matters (gap {gap:.2e})"
    torch.testing.assert_close(b, a, rtol=0, atol=3e-5)
    # backward: the same parameter gradients (relative to their size; eps 1e-6 moves them far more)
    ref(x).square().sum().backward()
    ours(x)[0].square().sum().backward()
    other(x).square().sum().backward()
    rel = lambda g, h: float((g - h).norm() / h.norm())  # noqa: E731
    for mine, theirs, moved in ((ours.w_k.grad[0], ref.k.weight.grad.t(), other.k.weight.grad.t()),
                                (ours.w_v.grad[0], ref.v.weight.grad.t(), other.v.weight.grad.t()),
                                (ours.ln_k_weight.grad[0], ref.norm_k.weight.grad, other.norm_k.weight.grad)):
        assert rel(mine, theirs) < 1e-4 < 0.1 * rel(moved, theirs), (rel(mine, theirs), rel(moved, theirs))


# ------------------------------------------------------------------------------------------ both stores verified
@pytest.mark.parametrize("split", ["train", "test"])
def test_probe_verifies_both_stores_of_a_pair(digits_stores, tmp_path, split):
    """A value changed inside a chunk of either store (still decodable, only its checksum can tell) stops the
    probe before any training, naming that store."""
    import zarr

    from probes.runner import discover, run_heads

    root = tmp_path / "root" / "digits" / "m"
    root.mkdir(parents=True)
    for s in ("train", "test"):
        shutil.copytree(digits_stores[s], root / f"{s}.zarr")
    g = zarr.open_group(str(root / f"{split}.zarr"), mode="r+")
    g["cls"][5] = g["cls"][5] * 1.01
    (pair,) = discover(tmp_path / "root")
    out = tmp_path / "results"
    with pytest.raises(StoreError, match=rf"{split}\.zarr' is damaged: chunk 0 .*fails its checksum"):
        run_heads(pair, ["linear"], "quick", out, progress=False)
    assert not out.exists() or not list(out.rglob("*.json"))
    run_heads(pair, ["linear"], {"base": "quick", "lr": [0.1], "wd": [1e-4], "epochs": 1, "min_steps": 1}, out,
              progress=False, verify=False)  # the same pair trains when told not to verify
    assert list(out.rglob("linear.json"))


# ------------------------------------------------------------------------------------------ clipping per config
@pytest.mark.parametrize("head", ["linear-clsap", "alf"])
def test_grid_equals_alone_when_clipping_bites(head):
    """With a clip threshold every configuration's gradient exceeds - by different amounts - the one-pass grid
    still equals each configuration trained alone: each is clipped by its own norm."""
    from probes import HEADS
    from probes.train import predict_logits, train_configs
    from test_probes import planted

    cls, ap, y = planted(200, L=3, D=16, seed=1)
    fs = FeatureSet.from_arrays(cls=cls, ap=ap, labels=y)
    spec = HEADS[head]
    grid = Protocol(epochs=2, min_steps=20, batch_size=64, clip=0.05)
    tokens = spec.token_spec(grid)
    configs = [{"lr": 1e-2, "wd": 1e-4, "dropout": 0.0}, {"lr": 1e-3, "wd": 1e-1, "dropout": 0.0},
               {"lr": 1e-1, "wd": 1e-6, "dropout": 0.0}]
    run = dict(batch_size=50, seed=3, device=torch.device("cpu"), progress=False)
    together, _ = train_configs(fs, fs.rows, spec, tokens, configs, grid, **run)
    lt, _ = predict_logits(together, fs, fs.rows, tokens, torch.device("cpu"))
    unclipped, _ = train_configs(fs, fs.rows, spec, tokens, configs, Protocol(epochs=2, min_steps=20, batch_size=64),
                                 **run)
    lu, _ = predict_logits(unclipped, fs, fs.rows, tokens, torch.device("cpu"))
    assert np.abs(lu - lt).max() > 1e-2, "the threshold must change training"
    for i, c in enumerate(configs):
        alone, _ = train_configs(fs, fs.rows, spec, tokens, [c], grid, **run)
        la, _ = predict_logits(alone, fs, fs.rows, tokens, torch.device("cpu"))
        # float32 rounding moves ALF at lr 0.1 by up to ~0.008 here; one norm for all configurations moves
        # every head by 0.07-5 (measured)
        np.testing.assert_allclose(lt[i], la[0], rtol=0, atol=1.5e-2)
