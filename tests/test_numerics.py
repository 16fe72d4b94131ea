"""Autocast on the extraction path (exercised on CPU with bf16): checked against float32 before writing,
recorded in the store with the attention backend, and never mixed with float32 stores."""
import numpy as np
import pytest
import torch

from alfcache.backbones import load_backbone
from alfcache.errors import AlfError
from alfcache.extract import ExtractConfig, extract
from alfcache.loader import first_readable
from alfcache.datasets import open_source
from alfcache.numerics import amp_agreement, resolve_autocast
from alfcache.taps import TapCollector, resolve_taps
from conftest import run_alf
from probes import FeatureSet
from probes.errors import ProbeError
from probes.features import check_compatible


def _cfg(model, out, amp, splits=("train",)):
    return ExtractConfig(model=str(model), dataset="digits", splits=list(splits), out=out, workers=0, batch_size=64,
                         device="cpu", amp=amp, progress=False)


def test_bf16_extraction_is_checked_recorded_and_close_to_float32(tiny_model, tmp_path):
    bf = extract(_cfg(tiny_model, tmp_path / "bf", "bf16", ("train", "test")))
    fp = extract(_cfg(tiny_model, tmp_path / "fp", "off", ("train", "test")))
    a, b = FeatureSet.open(bf[0].path), FeatureSet.open(fp[0].path)
    ex = a.meta["extraction"]
    assert ex["autocast"] == "bfloat16" and ex["amp_check"]["images"] == 16
    assert 0.99 <= ex["amp_check"]["min_cosine"] < 1.0 and 0 < ex["amp_check"]["max_rel_error"] < 0.1
    assert ex["attention"]["device_type"] == "cpu" and "timm_fused_attn" in ex["attention"]
    assert b.meta["extraction"]["autocast"] is None and b.meta["extraction"]["amp_check"] is None
    # the stored bf16 tokens are close to, but not the same as, the float32 ones
    x, y = np.asarray(a.ap[:], np.float32), np.asarray(b.ap[:], np.float32)
    assert not np.array_equal(x, y)
    cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    assert cos.min() > 0.99
    # a rerun at another precision does not touch the store; probing bf16 train with float32 test is refused
    with pytest.raises(AlfError, match="extraction.autocast"):
        extract(_cfg(tiny_model, tmp_path / "bf", "off"))
    with pytest.raises(ProbeError, match="autocast precision"):
        check_compatible(a, FeatureSet.open(fp[1].path))
    check_compatible(a, FeatureSet.open(bf[1].path))


def test_agreement_check_refuses_beyond_its_limit(tiny_model):
    bb = load_backbone(f"local-dir:{tiny_model}")
    col = TapCollector(bb.model, resolve_taps(bb.model, "alf", bb.layout), bb.num_prefix_tokens)
    x = first_readable(open_source("digits", "train"), bb.transform(), bb.data_config["input_size"], torch.device("cpu"))
    rec = amp_agreement(bb.forward, col, x, "bfloat16")
    assert rec["min_cosine"] < 1.0 and rec["worst_array"] in ("cls", "ap")
    with pytest.raises(AlfError, match="disagrees with float32") as e:
        amp_agreement(bb.forward, col, x, "bfloat16", min_cosine=(rec["min_cosine"] + 1) / 2)
    assert "\n" not in str(e.value) and "--amp off" in str(e.value)


def test_amp_choices(tmp_path):
    cpu = torch.device("cpu")
    assert resolve_autocast("auto", cpu) is None and resolve_autocast(True, cpu) is None
    assert resolve_autocast("bf16", cpu) == "bfloat16" and resolve_autocast("off", torch.device("cuda")) is None
    p = run_alf("extract", "--model", "vit-b", "--dataset", "digits", "--amp", "fp8", "--out", tmp_path)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "unknown --amp 'fp8'" in p.stderr
