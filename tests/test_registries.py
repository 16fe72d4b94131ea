"""Every registry entry works: each model short name (built on the meta device, both extraction protocols) has
the static facts `alf models` prints, its taps resolve and its preprocessing is 224 px; each head trains,
predicts and reloads on a tiny feature set; and the package boundary holds (probes imports no backbone library
and of alfcache only the store format)."""
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

from alfcache.registry import MODELS, PROTOCOLS
from alfcache.taps import resolve_taps
from probes import HEADS, FeatureSet, FittedProbe, fit


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_builds_on_meta_with_its_stated_facts(name):
    e = MODELS[name]
    for protocol in PROTOCOLS:
        with torch.device("meta"):
            m = timm.create_model(e.timm_id, pretrained=False, **e.architecture(protocol))
        assert (len(m.blocks), int(m.embed_dim)) == (e.blocks, e.width)
        assert int(m.num_prefix_tokens) + int(m.patch_embed.num_patches) == e.tokens
        assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == e.params_m
        plan = resolve_taps(m, "alf")
        assert len(plan.modules) == e.blocks and plan.modules[-1] == "norm" and plan.modules[0] == "blocks.1.norm2"
        if e.projection:
            assert m.head.out_features == e.projection and m.head.in_features == e.width
        cfg = timm.data.resolve_data_config(args=e.data_overrides(protocol), model=m)
        assert tuple(cfg["input_size"]) == (3, 224, 224)


def _tiny(n=60, L=3, D=12, E=8, P=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    cls = rng.standard_normal((n, L, D)) + np.eye(D)[y][:, None]
    return FeatureSet.from_arrays(cls=cls, ap=cls[:, ::-1].copy(), patches=rng.standard_normal((n, P, D)), labels=y,
                                  projection=(rng.standard_normal((E, D)), rng.standard_normal(E)))


@pytest.mark.parametrize("head", list(HEADS))
def test_every_head_trains_predicts_and_reloads(head, tmp_path):
    fs = _tiny()
    protocol = {"base": "quick", "lr": (0.1,), "wd": (1e-4,), "dropout": (0.0,), "epochs": 1, "min_steps": 3}
    probe = fit(fs, head, protocol=protocol, progress=False)
    logits = probe.logits(fs)
    assert logits.shape == (60, 3) and np.isfinite(logits).all()
    if HEADS[head].has_attention:
        att = probe.attention(fs)
        np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)
    probe.save(tmp_path / head.replace(":", "-"))
    back = FittedProbe.load(tmp_path / head.replace(":", "-"))
    np.testing.assert_allclose(back.logits(fs), logits, rtol=1e-5, atol=1e-5)
    assert head in repr(probe)


def test_probes_imports_no_backbone_library_and_only_the_store_format_of_alfcache():
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        top = name.split('.')[0]
        if top in ('timm', 'transformers', 'torchvision', 'alfstudy') or (name.startswith('alfcache.') and name != 'alfcache.format'):
            raise ImportError('blocked: ' + name)
        return None
sys.meta_path.insert(0, Block())
import numpy as np
import probes
from probes import FeatureSet, fit, HEADS
from probes import runner, results
fs = FeatureSet.from_arrays(cls=np.random.default_rng(0).standard_normal((40, 2, 4)), labels=np.arange(40) % 2)
fit(fs, 'alf', protocol={'base': 'quick', 'lr': (0.1,), 'wd': (1e-4,), 'dropout': (0.0,), 'epochs': 1,
                         'min_steps': 2}, progress=False)
print('ok', sorted(m for m in sys.modules if m.startswith('alfcache')))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "ok ['alfcache', 'alfcache.format']" in p.stdout


def test_the_packages_import_only_downwards():
    """The house reads extract -> store -> probe -> study: alfcache imports neither probes nor alfstudy, probes
    imports no alfstudy and of alfcache only the store contract, and every import (also the ones inside
    functions) is seen here - read from the source, not from what one run happens to load."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def imports(pkg):
        for f in sorted((root / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    yield from ((f.name, a.name) for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    yield f.name, node.module

    bad = [(f, m) for f, m in imports("alfcache") if m.split(".")[0] in ("probes", "alfstudy", "cli")]
    bad += [(f, m) for f, m in imports("probes")
            if m.split(".")[0] in ("alfstudy", "cli", "timm", "transformers", "torchvision")
            or (m.split(".")[0] == "alfcache" and m != "alfcache.format")]
    assert bad == []
    assert any(m.startswith("probes") for _, m in imports("alfstudy"))  # the study does use both packages
