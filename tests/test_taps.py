"""Tokens written by the hooks equal an independent computation from the same model."""
import numpy as np
import pytest
import timm
import torch

from alfcache.backbones import load_backbone
from alfcache.taps import TapCollector, resolve_taps


def manual_tokens(model, x, num_prefix):
    """Run the ViT block by block by hand, taking LayerNorm2 outputs, block outputs and the final norm."""
    h = model.patch_embed(x)
    h = model._pos_embed(h)
    h = model.norm_pre(model.patch_drop(h))
    norm2, block_out = [], []
    for blk in model.blocks:
        h = h + blk.ls1(blk.attn(blk.norm1(h)))
        n2 = blk.norm2(h)
        norm2.append(n2)
        h = h + blk.ls2(blk.mlp(n2))
        block_out.append(h)
    final = model.norm(h)
    pool = lambda t: (t[:, 0], t[:, num_prefix:].mean(1))
    return norm2, block_out, final, pool


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_hooks_equal_manual_forward(reg_tokens):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                              depth=5, num_heads=3, reg_tokens=reg_tokens, num_classes=0).eval()
    n_prefix = model.num_prefix_tokens
    assert n_prefix == 1 + reg_tokens
    x = torch.randn(3, 3, 32, 32)
    norm2, block_out, final, pool = manual_tokens(model, x, n_prefix)
    for spec, expected in (("alf", norm2[1:] + [final]), ("blocks", block_out + [final])):
        plan = resolve_taps(model, spec)
        col = TapCollector(model, plan, n_prefix)
        with col.attached(), torch.no_grad():
            model.forward_features(x)
        out = col.collect()
        cls, ap = out["cls"], out["ap"]
        assert set(out) == {"cls", "ap"}
        assert cls.shape == (3, len(expected), 48)
        for l, t in enumerate(expected):
            c, a = pool(t)
            torch.testing.assert_close(cls[:, l], c, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ap[:, l], a, rtol=1e-5, atol=1e-5)
    # AP excludes CLS and registers: it differs from a mean that wrongly includes them
    wrong = final[:, 1:].mean(1)
    if reg_tokens:
        assert not torch.allclose(ap[:, -1], wrong, atol=1e-4)
    # the last tap equals the model's own final features
    ff = model.forward_features(x)
    torch.testing.assert_close(cls[:, -1], ff[:, 0].detach(), rtol=1e-5, atol=1e-5)
    # hooks are removed afterwards
    assert all(not m._forward_hooks for m in model.modules())


def test_alf_tap_set_is_papers(tiny_model):
    bb = load_backbone(f"local-dir:{tiny_model}")
    plan = resolve_taps(bb.model, "alf")
    assert plan.modules == ["blocks.1.norm2", "blocks.2.norm2", "blocks.3.norm2", "norm"]  # L = n = 4
    assert len(resolve_taps(bb.model, "blocks").modules) == bb.depth + 1


def test_store_tokens_equal_manual_forward(tiny_model, digits_stores):
    """End to end: what the store holds (fp16) equals running the blocks by hand on the same images."""
    import zarr

    from alfcache.datasets import open_source

    bb = load_backbone(f"local-dir:{tiny_model}")
    src = open_source("digits", "test")
    tf = bb.transform()
    rows = [0, 7, 300]
    x = torch.stack([tf(src.load(i)) for i in rows])
    with torch.no_grad():
        norm2, _, final, pool = manual_tokens(bb.model, x, bb.num_prefix_tokens)
    g = zarr.open_group(str(digits_stores["test"]), mode="r")
    for l, t in enumerate(norm2[1:] + [final]):
        c, a = pool(t)
        np.testing.assert_allclose(g["cls"][rows, l].astype(np.float32), c.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(g["ap"][rows, l].astype(np.float32), a.numpy(), rtol=2e-3, atol=2e-3)
    assert list(g["labels"][rows]) == [int(src.labels[i]) for i in rows]
    assert list(g["sample_ids"][rows]) == [src.sample_id(i) for i in rows]
