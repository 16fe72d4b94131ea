"""Every registry family (timm ViT, DINOv2, CLIP, MAE), loaded through its real hub id from a Hugging Face cache
laid out as a login node leaves it (random weights), extracts the tokens the authors' pipeline computes.

The reference side is an independent reimplementation of that pipeline: the transforms written out with
torchvision as thingsvision / open_clip build them, the models built the ordinary way with the same weights,
forward hooks on the authors' tap modules (`blocks.{i}.norm2`, final `norm`; CLIP's `visual` = projection of
ln_post over every token), DINOv2's position embeddings interpolated on the fly the way torch.hub's DINOv2 does.
"""
import io

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import run_alf
from hubcache import cache_model, cache_wds_dataset

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
OPENAI = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
# name -> (timm architecture, create kwargs of the checkpoint as the hub holds it)
FAMILIES = {
    "vit-s": ("vit_small_patch16_224", {}),
    "dinov2-s": ("vit_small_patch14_dinov2", {"img_size": 518}),
    "clip-b32": ("vit_base_patch32_clip_224", {"num_classes": 512}),
    "mae-b": ("vit_base_patch16_224", {"num_classes": 0}),
}


def real_images():
    """Crops of scikit-learn's two bundled photographs, of different sizes and aspect ratios."""
    from sklearn.datasets import load_sample_image

    china, flower = load_sample_image("china.jpg"), load_sample_image("flower.jpg")
    crops = [china[:300, :400], china[50:427, 100:350], flower[20:420, 0:640], flower[100:300, 200:500]]
    return [Image.fromarray(np.ascontiguousarray(c)) for c in crops]


def reference_transform(family: str):
    """The authors' transforms as thingsvision 2.7.2 / open_clip 3.1.0 / timm build them (docs/REPRODUCING.md)."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    if family == "vit-s":  # timm's own pretrained config: crop_pct 0.9 -> Resize(248), mean/std 0.5
        return T.Compose([T.Resize(248, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                          T.Normalize([0.5] * 3, [0.5] * 3)])
    if family == "clip-b32":  # open_clip's eval transform
        return T.Compose([T.Resize(224, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(224),
                          lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(*OPENAI)])
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(*IMAGENET)])  # thingsvision default


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache with random weights under the real repo ids of one model per family, and the paper's
    `dtd` dataset as a web dataset of a few real photographs."""
    from alfcache.registry import MODELS, hub_repo

    cache = tmp_path_factory.mktemp("hf") / "hub"
    weights = {}
    for i, (name, (arch, kwargs)) in enumerate(FAMILIES.items()):
        torch.manual_seed(i)
        sd = timm.create_model(arch, pretrained=False, **kwargs).state_dict()
        cache_model(cache, hub_repo(MODELS[name]), sd)
        weights[name] = sd
    imgs = real_images()
    jpg = []
    for im in imgs:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        jpg.append(buf.getvalue())
    samples = [(f"s{i:04d}", data, "jpg", i % 3) for i, data in enumerate(jpg)]
    cache_wds_dataset(cache, "clip-benchmark/wds_vtab-dtd", {"train": samples, "test": samples[:3]},
                      ["banded", "blotchy", "braided"])
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "ALF_DATASETS_DIR": ""}
    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in jpg]  # what the dataset reader sees
    return {"cache": cache, "weights": weights, "env": env, "images": decoded}


def reference_model(name: str, state_dict: dict):
    arch, kwargs = FAMILIES[name]
    if name == "clip-b32":  # open_clip 3.1 with the plain ViT-B-32 name runs the OpenAI weights with nn.GELU
        kwargs = {**kwargs, "act_layer": torch.nn.GELU}
    model = timm.create_model(arch, pretrained=False, **kwargs)
    model.load_state_dict(state_dict)
    return model.eval()


def dinov2_hub_forward(model, x):
    """DINOv2 as torch.hub runs it at 224 px: position embeddings of the 518-px model interpolated on every
    forward pass, bicubic with scale factor (16 + 0.1) / 37, no antialiasing."""
    b = x.shape[0]
    t = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat([model.cls_token.expand(b, -1, -1), t], dim=1)
    pe = model.pos_embed.float()
    m, w0, d = 37, x.shape[-1] // 14, pe.shape[-1]
    grid = F.interpolate(pe[:, 1:].reshape(1, m, m, d).permute(0, 3, 1, 2), scale_factor=((w0 + 0.1) / m,) * 2,
                         mode="bicubic", antialias=False)
    t = t + torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, w0 * w0, d)], dim=1)
    for blk in model.blocks:
        t = blk(t)
    return model.norm(t)


def reference_tokens(name: str, model, x):
    """(cls, ap) of the authors' taps: blocks 1..n-1 norm2 and the final tap, CLS = token 0, AP = tokens 1:."""
    taps = [f"blocks.{i}.norm2" for i in range(1, len(model.blocks))] + ["norm"]
    acts = {}
    modules = dict(model.named_modules())
    hooks = [modules[t].register_forward_hook(lambda m, i, o, t=t: acts.__setitem__(t, o)) for t in taps]
    with torch.no_grad():
        dinov2_hub_forward(model, x) if name == "dinov2-s" else model.forward_features(x)
        if name == "clip-b32":  # `visual` with pool_type none: projection of ln_post over every token
            acts["norm"] = model.head(acts["norm"])
    for h in hooks:
        h.remove()
    cls = [acts[t][:, 0] for t in taps]
    ap = [acts[t][:, 1:].mean(1) for t in taps]
    return cls, ap


def test_transforms_equal_the_authors(hub, monkeypatch):
    """Each registry family's preprocessing equals the authors' transform on real photographs."""
    import huggingface_hub.constants

    from alfcache.backbones import load_backbone

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in FAMILIES:
        bb = load_backbone(name)
        ref = reference_transform(name)
        for im in real_images():
            a, b = bb.transform()(im), ref(im)
            assert a.shape == b.shape == (3, 224, 224), name
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
        if name == "clip-b32":  # the paper's CLIP activation is nn.GELU (open_clip 3.x accident); clean: QuickGELU
            assert type(bb.model.blocks[0].mlp.act).__name__ == "GELU"
            assert bb.projection[0].shape == (512, 768) and bb.architecture["act_layer"] == "gelu"
            clean = load_backbone(name, protocol="clean")
            assert type(clean.model.blocks[0].mlp.act).__name__ == "QuickGELU"
        else:
            assert bb.projection is None
    # clean DINOv2 / MAE resize bicubically (their own evaluation transforms)
    assert "bicubic" in repr(load_backbone("mae-b", protocol="clean").transform()).lower()


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.long
def test_extracted_tokens_equal_the_authors_pipeline(hub, tmp_path, name):
    """`alf extract --model <short name> --dataset <paper name>` offline from the cache: the stored tokens equal
    the authors' pipeline to float16 precision."""
    p = run_alf("extract", "--model", name, "--dataset", "dtd", "--out", tmp_path, "--workers", "0", "--split",
                "train", env=hub["env"])
    assert p.returncode == 0, p.stderr
    import zarr

    store = zarr.open_group(str(tmp_path / "dtd" / name / "train.zarr"), mode="r")
    meta = dict(store.attrs)
    assert meta["extraction"]["protocol"] == "paper" and meta["model"]["pretrained_weights"] is True
    model = reference_model(name, hub["weights"][name])
    imgs = hub["images"]
    ids = [str(s) for s in store["sample_ids"][:]]
    order = [int(s[1:]) for s in ids]  # keys s0000.. name the photograph
    x = torch.stack([reference_transform(name)(imgs[i]) for i in order])
    cls, ap = reference_tokens(name, model, x)
    depth = len(model.blocks)
    assert store["cls"].shape == (len(order), depth, meta["width"])
    got_cls, got_ap = store["cls"][:].astype(np.float32), store["ap"][:].astype(np.float32)
    last = depth - 1
    if name == "clip-b32":  # the final layer is stored before the projection, the projection beside it
        w, b = np.asarray(store["projection/weight"][:]), np.asarray(store["projection/bias"][:])
        assert w.shape == (512, 768) and meta["projection"]["width"] == 512
        got_cls = list(got_cls.transpose(1, 0, 2)[:last]) + [got_cls[:, last] @ w.T + b]
        got_ap = list(got_ap.transpose(1, 0, 2)[:last]) + [got_ap[:, last] @ w.T + b]
    else:
        got_cls, got_ap = list(got_cls.transpose(1, 0, 2)), list(got_ap.transpose(1, 0, 2))
    for layer in range(depth):
        for got, ref in ((got_cls[layer], cls[layer]), (got_ap[layer], ap[layer])):
            ref = ref.numpy()
            err = np.abs(got - ref).max() / np.abs(ref).max()
            assert err < 3e-3, (name, layer, err)  # float16 storage


def test_dinov2_hub_interpolation_differs_from_timm_resampling(hub):
    """The reason the registry does not use timm's load-time resampling for DINOv2: it gives other tokens."""
    from alfcache.timm_backbones import dinov2_hub_pos_embed

    pe = hub["weights"]["dinov2-s"]["pos_embed"]
    hub_style = dinov2_hub_pos_embed(pe, 16)
    from timm.layers import resample_abs_pos_embed

    timm_style = resample_abs_pos_embed(pe, (16, 16), num_prefix_tokens=1)
    assert hub_style.shape == timm_style.shape == (1, 257, 384)
    assert not torch.allclose(hub_style, timm_style, atol=1e-3)


@pytest.mark.serial  # a wall-clock limit: run after the parallel part, on an otherwise idle machine
def test_offline_empty_cache_fails_fast_in_one_line(tmp_path):
    import time

    env = {"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    p = run_alf("extract", "--model", "clip-l", "--dataset", "digits", "--out", tmp_path / "f", env=env)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "timm/vit_large_patch14_clip_224.openai" in p.stderr and "alf fetch --model clip-l" in p.stderr
    assert time.time() - t0 < 20
    assert not (tmp_path / "f").exists()


def test_fetch_check_reports_cached_and_missing_offline(hub):
    """`alf fetch --check` on a compute node: what the login node put in the cache is complete, the rest is named
    as missing (size unknown without the hub) and the exit status says something is missing."""
    p = run_alf("fetch", "--check", "--model", "vit-s,clip-b32,vit-l", "--dataset", "dtd,fer2013", env=hub["env"])
    assert p.returncode == 1, p.stderr
    rows = {line.split()[1]: line for line in p.stdout.splitlines() if line.startswith(("model", "dataset"))}
    assert set(rows) == {"vit-s", "clip-b32", "vit-l", "dtd", "fer2013"}
    for name in ("vit-s", "clip-b32", "dtd"):
        assert rows[name].rstrip().endswith("ok"), rows[name]
    for name in ("vit-l", "fer2013"):
        assert "MISSING" in rows[name] and "unknown (hub unreachable)" in rows[name], rows[name]
    assert "timm/vit_large_patch16_224.augreg_in21k_ft_in1k" in rows["vit-l"]
    assert "3 of 5 complete; missing: 2" in p.stdout
    done = run_alf("fetch", "--check", "--model", "vit-s", "--dataset", "dtd", env=hub["env"])
    assert done.returncode == 0 and "1 of" not in done.stdout and "2 of 2 complete" in done.stdout, done.stdout
