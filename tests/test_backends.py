"""transformers backend, module-level taps, registers and patch tokens: hooks vs independent computations."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from alfcache.backbones import load_backbone
from alfcache.extract import ExtractConfig, extract
from alfcache.taps import MODULE_KINDS, TapCollector, resolve_taps
from probes import FeatureSet, fit


def _images(n=3, size=40, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _save_hf(kind, path):
    import transformers as tr

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8)
    if kind == "vit":
        model, proc = tr.ViTModel(tr.ViTConfig(**common)), tr.ViTImageProcessor(size={"height": 32, "width": 32})
    elif kind == "dinov2-reg":
        model = tr.Dinov2WithRegistersModel(tr.Dinov2WithRegistersConfig(**common, num_register_tokens=4))
        proc = tr.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        model = tr.CLIPVisionModel(tr.CLIPVisionConfig(**common))
        proc = tr.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind,regs", [("vit", 0), ("dinov2-reg", 4), ("clip", 0)])
def test_hf_backend_tokens_equal_hidden_states(tmp_path, kind, regs):
    bb = load_backbone(f"hf:{_save_hf(kind, tmp_path / kind)}")
    assert bb.library == "transformers" and bb.depth == 3 and bb.width == 32
    assert bb.num_registers == regs and bb.num_prefix_tokens == 1 + regs and bb.num_patches == 16
    x = torch.stack([bb.transform()(im) for im in _images()])
    assert x.shape == (3, 3, 32, 32)
    with torch.no_grad():
        hs = bb.model(pixel_values=x, output_hidden_states=True).hidden_states
    final_norm = dict(bb.model.named_modules())[bb.layout.final]
    p = bb.num_prefix_tokens
    for spec, expected in (("blocks", [*hs[1:], final_norm(hs[-1])]),):
        plan = resolve_taps(bb.model, spec, bb.layout)
        col = TapCollector(bb.model, plan, p, num_registers=regs)
        with col.attached(), torch.no_grad():
            bb.forward(x)
        out = col.collect()
        assert out["cls"].shape == (3, len(expected), 32)
        for l, t in enumerate(expected):
            torch.testing.assert_close(out["cls"][:, l], t[:, 0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out["ap"][:, l], t[:, p:].mean(1), rtol=1e-5, atol=1e-5)  # registers excluded
            if regs:
                torch.testing.assert_close(out["registers"][:, l], t[:, 1:p], rtol=1e-5, atol=1e-5)
    if kind == "clip":  # transformers' own pooled output = post_layernorm(CLS): our last CLS equals it
        with torch.no_grad():
            pooled = bb.model(pixel_values=x).pooler_output
        torch.testing.assert_close(out["cls"][:, -1], pooled, rtol=1e-5, atol=1e-5)


def test_hf_vit_alf_taps_equal_manual_layernorm2(tmp_path):
    bb = load_backbone(f"hf:{_save_hf('vit', tmp_path / 'vit')}")
    x = torch.stack([bb.transform()(im) for im in _images()])
    plan = resolve_taps(bb.model, "alf", bb.layout)
    blocks = bb.layout.blocks  # "encoder.layer" (transformers 4) or "layers" (5)
    assert plan.modules == [f"{blocks}.1.layernorm_after", f"{blocks}.2.layernorm_after", "layernorm"]
    col = TapCollector(bb.model, plan, 1)
    with col.attached(), torch.no_grad():
        bb.forward(x)
        out = col.collect()
        hs = bb.model(pixel_values=x, output_hidden_states=True).hidden_states
        for l, i in enumerate((1, 2)):
            layer = dict(bb.model.named_modules())[f"{blocks}.{i}"]
            a = layer.attention(layer.layernorm_before(hs[i]))
            a = a[0] if isinstance(a, tuple) else a
            n2 = layer.layernorm_after(hs[i] + a)
            torch.testing.assert_close(out["cls"][:, l], n2[:, 0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out["ap"][:, l], n2[:, 1:].mean(1), rtol=1e-5, atol=1e-5)


def test_hf_hub_id_offline_one_line(monkeypatch):
    from alfcache.errors import AlfError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AlfError, match=r"model 'hf:facebook/dinov2-base': cannot get facebook/dinov2-base .*alf fetch --model hf:facebook/dinov2-base"):
        load_backbone("hf:facebook/dinov2-base")


def test_module_taps_equal_manual_block():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=24,
                              depth=3, num_heads=2, num_classes=0, init_values=0.5).eval()  # with LayerScale
    plan = resolve_taps(model, "modules")
    assert plan.module_kinds == list(MODULE_KINDS)
    col = TapCollector(model, plan, model.num_prefix_tokens)
    x = torch.randn(2, 3, 32, 32)
    with col.attached(), torch.no_grad():
        model.forward_features(x)
    out = col.collect()
    for k in MODULE_KINDS:
        width = 96 if k in ("ffn_fc1", "ffn_activation") else 24
        for pool in ("cls", "ap", "mean"):
            assert out[f"modules/{k}/{pool}"].shape == (2, 3, width)
    with torch.no_grad():  # block 1 by hand
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        h = model.blocks[0](h)
        blk = model.blocks[1]
        n1 = blk.norm1(h)
        a = blk.attn(n1)
        r = h + blk.ls1(a)
        n2 = blk.norm2(r)
        f1 = blk.mlp.fc1(n2)
        act = blk.mlp.act(f1)
        f2 = blk.mlp.fc2(blk.mlp.norm(act))
        res = r + blk.ls2(f2)
    manual = dict(attn_norm=n1, attn=a, attn_res=r, ffn_norm=n2, ffn_fc1=f1, ffn_activation=act, ffn_fc2=f2, ffn_res=res)
    for k, t in manual.items():
        torch.testing.assert_close(out[f"modules/{k}/cls"][:, 1], t[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[f"modules/{k}/ap"][:, 1], t[:, 1:].mean(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[f"modules/{k}/mean"][:, 1], t.mean(1), rtol=1e-5, atol=1e-5)
    # the main group of a modules store is the paper's ALF layout; ffn_norm of blocks 1.. equals it
    torch.testing.assert_close(out["cls"][:, :-1], out["modules/ffn_norm/cls"][:, 1:])


def test_modules_patches_registers_store_and_probes(tmp_path):
    from alfcache.backbones import build_random_model

    m = build_random_model(tmp_path / "reg", img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                           reg_tokens=2)
    res = extract(ExtractConfig(model=str(m), dataset="digits", out=tmp_path / "f", workers=0, taps="modules",
                                patches=True, registers=True, progress=False))
    train, test = FeatureSet.open(res[0].path), FeatureSet.open(res[1].path)
    assert train.patches.shape == (1347, 16, 32) and train.meta["model"]["num_registers"] == 2
    assert tuple(train.meta["arrays"]["registers"]["shape"]) == (1347, 3, 2, 32)
    assert set(train.module_taps) == set(MODULE_KINDS)
    act = train.select_tap("ffn_activation")
    assert act.width == 128 and act.num_layers == 3 and act.layer_names[0] == "block0.ffn_activation"
    from probes.selection import TokenSpec

    assert act.tokens(np.arange(4), TokenSpec("all", "mean")).shape == (4, 3, 128)
    grid = {"base": "quick", "lr": (1e-2,), "wd": (1e-4,), "dropout": (0.0,), "min_steps": 60, "epochs": 2}
    for head in ("attentive", "alf-patches"):
        p = fit(train, head, grid=grid, progress=False)
        assert p.attention(test).shape[-1] == (1 + 16 if head == "attentive" else 6 + 16)
        assert p.balanced_accuracy(test) > 20.0  # well above chance (10%) on real digits
    with pytest.raises(Exception, match="unknown tap 'ffn_act'"):
        train.select_tap("ffn_act")
