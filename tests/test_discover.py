"""How the probe stage pairs stores (`probes.runner.discover`), in process: by the identity the metadata records
(the dataset's resolved source and index fingerprint, the model's origin and weights fingerprint), never by
folder or file names; and each way a pair can be missing, named in one line word for word. The stores are real
extractions (digits through the tiny model) copied and given other identities by editing their metadata."""
from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import zarr

from alfcache.format import StoreError
from probes.errors import ProbeError
from probes import FeatureSet
from probes.runner import StorePair, discover

from conftest import fixture_dir

MODEL_FP = "sha256:" + "a" * 64
OTHER_FP = "sha256:" + "b" * 64


def not_a_pair(have: str, p, want: str, q, what: str) -> str:
    """The message for two stores of the same names and another identity."""
    return (f"the {have} store '{p}' and the {want} store '{q}' have the same names but differ in {what}; they are "
            f"not a pair - extract both splits from the same dataset with the same model")


def put(digits_stores, root, rel: str, split: str, *, complete=True, **changes) -> "Path":  # noqa: F821
    """Copy the digits store of `split` to root/rel and set metadata entries: changes={'dataset.source': ...}."""
    dst = root / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(digits_stores[split], dst)
    g = zarr.open_group(str(dst), mode="r+")
    attrs = dict(g.attrs)
    attrs["model"] = {**attrs["model"], "fingerprint": MODEL_FP}
    for key, value in changes.items():
        outer, inner = key.split(".")
        attrs[outer] = {**attrs[outer], inner: value}
    attrs["complete"] = complete
    g.attrs.put(attrs)
    return dst


def meta_of(digits_stores) -> dict:
    from alfcache.format import read_metadata

    return read_metadata(digits_stores["train"])


def test_pairs_by_metadata_not_by_folder_or_file_names(digits_stores, tmp_path):
    """The split and the identity come from the metadata: stores under unrelated names still pair."""
    tr = put(digits_stores, tmp_path, "a/anything.zarr", "train")
    te = put(digits_stores, tmp_path, "b/c/whatever.zarr", "test")
    (pair,) = discover(tmp_path)
    assert pair == StorePair("digits", "local-tiny", tr, te, "digits")
    assert pair.folder == "digits"
    # by name: what the metadata records, not the folder the user typed
    assert discover(tmp_path, dataset="digits", model="local-tiny") == [pair]


def test_same_names_other_identity_are_separate_groups(digits_stores, tmp_path):
    """Two pairs recording the same names, one of them from another source and weights: two pairs, each store
    with its own partner (never a train store of one with the test store of the other)."""
    a = [put(digits_stores, tmp_path, f"one/{s}.zarr", s) for s in ("train", "test")]
    b = [put(digits_stores, tmp_path, f"two/{s}.zarr", s, **{"dataset.source": "hf:other/digits",
                                                            "model.fingerprint": OTHER_FP}) for s in ("train", "test")]
    pairs = discover(tmp_path)
    assert sorted((p.train, p.test) for p in pairs) == sorted([tuple(a), tuple(b)])


@pytest.mark.parametrize("differ", ["dataset", "model", "both", "index"])
def test_a_split_of_another_identity_is_named_with_both_sides(digits_stores, tmp_path, differ):
    """The same names but another dataset source (or index fingerprint), or other weights: not a pair, and the
    message says which identity differs, naming both stores and both sources / fingerprints."""
    tr = put(digits_stores, tmp_path, "x/train.zarr", "train")
    change = {"dataset": {"dataset.source": "hf:other/digits"}, "model": {"model.fingerprint": OTHER_FP},
              "both": {"dataset.source": "hf:other/digits", "model.fingerprint": OTHER_FP},
              "index": {"dataset.index_fingerprint": "sha256:" + "c" * 64}}[differ]
    te = put(digits_stores, tmp_path, "y/test.zarr", "test", **change)
    with pytest.raises(ProbeError) as e:
        discover(tmp_path)
    msg = str(e.value)
    ds = "dataset source ('digits' (source sklearn:load_digits) vs 'digits' (source hf:other/digits))"
    index = (f"dataset index (the images of 'digits' (source sklearn:load_digits): "
             f"{meta_of(digits_stores)['dataset']['index_fingerprint'][:19]}... vs sha256:{'c' * 12}...)")
    fp = f"model or weights fingerprint ({MODEL_FP[:19]}... vs {OTHER_FP[:19]}...)"
    what = {"dataset": ds, "model": fp, "both": f"{ds} and {fp}", "index": index}[differ]
    # the group met first (sorted by names, then in insertion order) is the train store's
    assert msg == not_a_pair("train", tr, "test", te, what)


def test_a_lone_test_store_names_the_train_store_of_another_identity(digits_stores, tmp_path):
    """The group met first holds only a test store: its partner would be a train store, named as such."""
    te = put(digits_stores, tmp_path, "a/test.zarr", "test")
    tr = put(digits_stores, tmp_path, "b/train.zarr", "train", **{"model.fingerprint": OTHER_FP})
    with pytest.raises(ProbeError) as e:
        discover(tmp_path)
    assert str(e.value) == not_a_pair("test", te, "train", tr, f"model or weights fingerprint ({MODEL_FP[:19]}... vs "
                                                              f"{OTHER_FP[:19]}...)")


def test_a_store_without_source_beside_one_with_a_source(digits_stores, tmp_path):
    """A version-1 store (no recorded source) is named by its dataset name alone, the other with its source."""
    tr = put(digits_stores, tmp_path, "x/train.zarr", "train")
    te = put(digits_stores, tmp_path, "y/test.zarr", "test", **{"dataset.source": None})
    with pytest.raises(ProbeError) as e:
        discover(tmp_path)
    assert str(e.value) == not_a_pair("train", tr, "test", te,
                                      "dataset source ('digits' (source sklearn:load_digits) vs 'digits')")


def test_dataset_label_without_source(digits_stores, tmp_path):
    """A store without a recorded source (version 1) is named by its dataset name alone."""
    tr = put(digits_stores, tmp_path, "x/train.zarr", "train", **{"dataset.source": None})
    te = put(digits_stores, tmp_path, "y/test.zarr", "test", **{"model.fingerprint": OTHER_FP,
                                                              "dataset.source": None})
    with pytest.raises(ProbeError) as e:
        discover(tmp_path)
    assert str(e.value) == not_a_pair("train", tr, "test", te,
                                      f"model or weights fingerprint ({MODEL_FP[:19]}... vs {OTHER_FP[:19]}...)")


def test_a_missing_split_is_named(digits_stores, tmp_path):
    put(digits_stores, tmp_path, "digits/m/train.zarr", "train")
    with pytest.raises(ProbeError) as e:
        discover(tmp_path)
    assert str(e.value) == ("dataset 'digits' x model 'local-tiny' needs both train and test stores; found ['train'] "
                            "(run `alf extract` for the missing split)")
    # a group of the other split, same names, same identity as nothing: a test store alone says so too
    shutil.rmtree(tmp_path / "digits")
    put(digits_stores, tmp_path, "digits/m/test.zarr", "test")
    with pytest.raises(ProbeError, match=r"found \['test'\]"):
        discover(tmp_path)


def test_a_split_of_other_names_is_not_offered_as_the_partner(digits_stores, tmp_path):
    """Another identity under other names is not a candidate partner: the message is the missing split."""
    put(digits_stores, tmp_path, "a/train.zarr", "train")
    put(digits_stores, tmp_path, "b/test.zarr", "test", **{"dataset.name": "other", "dataset.source": "hf:o/x"})
    with pytest.raises(ProbeError, match=r"^dataset 'digits' x model 'local-tiny' needs both .*found \['train'\]"):
        discover(tmp_path, dataset="digits")


def test_a_damaged_store_where_the_partner_should_be_is_named(digits_stores, tmp_path):
    """A test store whose metadata cannot be read, beside a train store: the damage is the error (not 'missing')."""
    put(digits_stores, tmp_path, "digits/m/train.zarr", "train")
    bad = put(digits_stores, tmp_path, "digits/m/test.zarr", "test")
    (bad / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError) as e:
        discover(tmp_path)
    assert str(e.value).startswith(f"store '{bad}' is damaged: its metadata cannot be read")
    # a damaged store elsewhere (another folder, or named otherwise) is not taken for the partner
    for moved in ("digits/m/elsewhere.zarr", "digits/x/test.zarr"):
        (tmp_path / moved).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(bad, tmp_path / moved)
        bad = tmp_path / moved
        with pytest.raises(ProbeError, match="needs both train and test stores"):
            discover(tmp_path)


def test_damaged_stores_alone(digits_stores, tmp_path):
    """Only damaged stores: the damage is named; asked for a dataset, too (not 'unknown dataset')."""
    bad = put(digits_stores, tmp_path, "digits/m/test.zarr", "test")
    (bad / "zarr.json").write_text("{not json")
    for kw in ({}, {"dataset": "digits"}):
        with pytest.raises(StoreError, match=rf"^store '{bad}' is damaged"):
            discover(tmp_path, **kw)


def test_no_root_and_empty_root(tmp_path):
    with pytest.raises(ProbeError) as e:
        discover(tmp_path / "nope")
    assert str(e.value) == (f"store root '{tmp_path / 'nope'}' does not exist; run `alf extract` first or pass "
                            f"--store-root")
    with pytest.raises(ProbeError) as e:
        discover(tmp_path)
    assert str(e.value) == f"no alfcache stores under '{tmp_path}'; run `alf extract` first"


def test_filters_by_recorded_name_and_folder_slug(digits_stores, tmp_path):
    """`dataset` matches the recorded name or the dataset's folder slug; `model` the recorded model name;
    unknown ones are named with the known choices; known names without a pair of both say so."""
    for s in ("train", "test"):
        put(digits_stores, tmp_path, f"d1/{s}.zarr", s, **{"dataset.slug": "digits-v2"})
        put(digits_stores, tmp_path, f"d2/{s}.zarr", s, **{"dataset.name": "other", "dataset.slug": "other",
                                                           "dataset.source": "hf:o/x", "model.name": "m2"})
    assert [p.dataset for p in discover(tmp_path)] == ["digits", "other"]  # sorted by names
    (p,) = discover(tmp_path, dataset="digits-v2")
    assert (p.dataset, p.slug, p.folder) == ("digits", "digits-v2", "digits-v2")
    assert discover(tmp_path, dataset="digits") == [p]
    assert [q.model for q in discover(tmp_path, model="m2")] == ["m2"]
    with pytest.raises(ProbeError) as e:
        discover(tmp_path, dataset="digit")
    assert str(e.value) == ("unknown dataset (in the stores) 'digit'; did you mean 'digits', 'digits-v2'? "
                            "(known: digits, digits-v2, other)")
    with pytest.raises(ProbeError) as e:
        discover(tmp_path, model="m3")
    assert str(e.value) == "unknown model (in the stores) 'm3'; did you mean 'm2'? (known: local-tiny, m2)"
    with pytest.raises(ProbeError) as e:
        discover(tmp_path, dataset="digits", model="m2")
    assert str(e.value) == f"no stores for dataset=digits model=m2 under '{tmp_path}'"


def test_skip_unusable_leaves_out_incomplete_and_lone_stores(digits_stores, tmp_path):
    """Reports (`skip_unusable`): a group lacking a split, or holding an incomplete store, is left out without
    an error; without it an incomplete store still pairs (the probe refuses it later, by name)."""
    put(digits_stores, tmp_path, "a/train.zarr", "train")
    put(digits_stores, tmp_path, "a/test.zarr", "test")
    put(digits_stores, tmp_path, "b/train.zarr", "train", **{"dataset.name": "lone", "dataset.source": "hf:l/x"})
    put(digits_stores, tmp_path, "c/train.zarr", "train", **{"dataset.name": "half", "dataset.source": "hf:h/x"})
    put(digits_stores, tmp_path, "c/test.zarr", "test", complete=False, **{"dataset.name": "half",
                                                                           "dataset.source": "hf:h/x"})
    assert [p.dataset for p in discover(tmp_path, skip_unusable=True)] == ["digits"]
    for s in ("train", "test"):  # a pair after the incomplete store in path order is still found
        put(digits_stores, tmp_path, f"e/{s}.zarr", s, **{"dataset.name": "late", "dataset.source": "hf:e/x"})
    assert [p.dataset for p in discover(tmp_path, skip_unusable=True)] == ["digits", "late"]
    shutil.rmtree(tmp_path / "e")
    bad = put(digits_stores, tmp_path, "d/test.zarr", "test", **{"dataset.name": "bad"})
    (bad / "zarr.json").write_text("{not json")
    assert [p.dataset for p in discover(tmp_path, skip_unusable=True)] == ["digits"]  # damage skipped too
    shutil.rmtree(tmp_path / "b")
    shutil.rmtree(bad)
    assert [p.dataset for p in discover(tmp_path)] == ["digits", "half"]
    with pytest.raises(ProbeError, match=r"no stores for dataset=lone"):
        put(digits_stores, tmp_path, "b/train.zarr", "train", **{"dataset.name": "lone", "dataset.source": "hf:l/x"})
        discover(tmp_path, dataset="lone", skip_unusable=True)


def test_first_store_of_a_split_wins_in_path_order(digits_stores, tmp_path):
    """Two copies of one split with one identity: the first in path order is the one paired (stable)."""
    put(digits_stores, tmp_path, "b/train.zarr", "train")
    first = put(digits_stores, tmp_path, "a/train.zarr", "train")
    te = put(digits_stores, tmp_path, "c/test.zarr", "test")
    (p,) = discover(tmp_path)
    assert (p.train, p.test) == (first, te)


def test_run_heads_defaults_and_provenance(digits_stores, tmp_path, capsys):
    """A pair run with the defaults: seed 0, progress shown, both stores verified; the result names its stores,
    their identity and the chance level; files land under the dataset's folder and the model."""
    from probes.runner import run_heads

    tr, te = (put(digits_stores, tmp_path, f"r/{s}.zarr", s) for s in ("train", "test"))
    (pair,) = discover(tmp_path / "r")
    (rec,) = run_heads(pair, ["linear"], {"base": "quick", "lr": [0.1], "wd": [1e-4], "epochs": 1, "min_steps": 1},
                       tmp_path / "out")
    err = capsys.readouterr().err
    assert "linear: grid of 1" in err and "linear: retrain best" in err
    assert rec["seeds"] == [0] and rec["n_seeds"] == 1
    assert (rec["train_store"], rec["test_store"]) == (str(tr), str(te))
    assert (rec["dataset"], rec["dataset_folder"], rec["model"], rec["head"], rec["tap"]) == \
        ("digits", "digits", "local-tiny", "linear", "main")
    assert rec["protocol_name"] == "custom" and rec["weights_fingerprint"] == MODEL_FP
    assert rec["dataset_source"] == "sklearn:load_digits" and rec["n_test"] == 450
    assert rec["chance"] == pytest.approx(10.0)
    # the model's origin, weights and extraction protocol as the train store records them (put() sets the
    # fingerprint; the rest is the extraction's own), the test set's class names, and when the result was made
    meta = meta_of(digits_stores)
    assert rec["model_source"] == meta["model"]["source_id"] and rec["model_source"].startswith("local-dir:")
    assert rec["pretrained_weights"] is meta["model"]["pretrained_weights"] is False
    assert rec["extraction_protocol"] == meta["extraction"]["protocol"] and rec["extraction_protocol"]
    assert rec["class_names"] == [str(i) for i in range(10)] == meta["class_names"]
    made = time.strptime(rec["finished_at"], "%Y-%m-%dT%H:%M:%S")
    assert abs(time.mktime(made) - time.time()) < 600
    files = sorted(p.name for p in (tmp_path / "out" / "digits" / "local-tiny").iterdir())
    assert files == ["linear.json", "linear_probe.json", "linear_probe.safetensors"]
    # no cache_dir: the stores are read where they are (a cache is only for object storage)
    with pytest.raises(TypeError, match="^mirror_store needs a cache_dir$"):
        from alfcache.format import mirror_store

        mirror_store(tr, None)


TINY = {"base": "quick", "lr": [0.1], "wd": [1e-4], "epochs": 1, "min_steps": 1}


@pytest.fixture(scope="module")
def tapped_stores(tiny_model, tmp_path_factory):
    """digits through the tiny model with module taps and last-layer patch tokens (both splits)."""
    from alfcache.extract import ExtractConfig, extract

    with fixture_dir(tmp_path_factory, "tapped") as (out, todo):
        if todo:
            extract(ExtractConfig(model=f"local-dir:{tiny_model}", dataset="digits", out=out, workers=0,
                                  batch_size=128, taps="modules", patches=True, progress=False))
    return out


def test_run_heads_on_a_module_tap_trains_both_splits_on_that_tap(tapped_stores, tmp_path):
    """`tap`: train and test are both read through the module tap (never one through the main layers): the
    result equals fitting the tap's features directly, and differs from the main layers' result."""
    from probes.fitting import fit
    from probes.runner import run_heads

    (pair,) = discover(tapped_stores)
    train, test = FeatureSet.open(pair.train), FeatureSet.open(pair.test)
    kind = train.module_taps[0]
    P = {**TINY, "epochs": 5, "min_steps": 100}  # trained enough to score above chance on the tap
    (rec,) = run_heads(pair, ["linear"], P, tmp_path / "out", tap=kind, progress=False)
    direct = fit(train.select_tap(kind), "linear", protocol=P, seed=0, progress=False)
    assert (rec["head"], rec["tap"]) == (f"linear@{kind}", kind)
    assert rec["test_balanced_accuracy"] == pytest.approx(direct.balanced_accuracy(test.select_tap(kind)), abs=1e-9)
    assert rec["test_balanced_accuracy"] > 15  # above chance (10%): a probe that predicts one class would not tell
    (main,) = run_heads(pair, ["linear"], TINY, tmp_path / "out", progress=False)
    assert main["tap"] == "main" and main["test_balanced_accuracy"] != rec["test_balanced_accuracy"]
    from probes.results import _slug

    assert (tmp_path / "out" / "digits" / "local-tiny" / f"{_slug(f'linear@{kind}')}.json").exists()


def test_run_heads_all_and_patch_heads(digits_stores, tmp_path):
    """'all' = every head the stores support (no patch heads without patch tokens); a patch head on stores
    without patch tokens is refused by name before any training."""
    from probes.heads import HEADS
    from probes.runner import run_heads

    for s in ("train", "test"):
        put(digits_stores, tmp_path, f"r/{s}.zarr", s)
    (pair,) = discover(tmp_path / "r")
    with pytest.raises(ProbeError) as e:
        run_heads(pair, ["linear", "alf-patches"], TINY, tmp_path / "out", progress=False)
    assert str(e.value) == ("head 'alf-patches' needs last-layer patch tokens; the store has none (extract with "
                            "--patches)")
    assert not (tmp_path / "out").exists()
    recs = run_heads(pair, ["all"], {**TINY, "lr": [0.1], "wd": [0.0]}, tmp_path / "out", progress=False)
    assert [r["head"] for r in recs] == [n for n, h in HEADS.items() if not h.tokens.patches]


def test_run_heads_incomplete_stores_and_a_local_cache_dir(digits_stores, tmp_path):
    """Incomplete stores are refused unless allowed (then read as they are, not verified); a cache dir changes
    nothing for stores on a local disk (nothing is copied) - the same result."""
    from probes.runner import run_heads

    for s in ("train", "test"):
        put(digits_stores, tmp_path, f"r/{s}.zarr", s, complete=False)
    (pair,) = discover(tmp_path / "r")
    with pytest.raises(ProbeError, match=r"^store '.*train.zarr' is incomplete \(extraction did not finish\)"):
        run_heads(pair, ["linear"], TINY, tmp_path / "out", progress=False)
    (rec,) = run_heads(pair, ["linear"], TINY, tmp_path / "out", progress=False, allow_incomplete=True)
    for s in ("train", "test"):
        shutil.rmtree(tmp_path / "r" / f"{s}.zarr")
        put(digits_stores, tmp_path, f"r/{s}.zarr", s)
    (pair,) = discover(tmp_path / "r")
    (cached,) = run_heads(pair, ["linear"], TINY, tmp_path / "out2", progress=False, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    assert cached["test_balanced_accuracy"] == rec["test_balanced_accuracy"]
    assert cached["train_store"] == str(pair.train)


def test_run_heads_several_seeds_attention_and_saved_probes(digits_stores, tmp_path):
    """seeds=2 from seed 3: each seed's figures equal fitting with that seed alone; the record holds their mean and
    spread; the attention written is the mean over seeds of each probe's attention on the test set (per image,
    averaged over heads); each seed's probe is saved and loads back to the same predictions; `on_result` sees
    each record as it is written."""
    from probes.fitting import FittedProbe, fit
    from probes.runner import run_heads

    for s in ("train", "test"):
        put(digits_stores, tmp_path, f"r/{s}.zarr", s)
    (pair,) = discover(tmp_path / "r")
    seen = []
    recs = run_heads(pair, ["linear", "alf"], TINY, tmp_path / "out", seed=3, seeds=2, progress=False,
                     on_result=seen.append)
    assert seen == recs and [r["head"] for r in recs] == ["linear", "alf"]
    train, test = FeatureSet.open(pair.train), FeatureSet.open(pair.test)
    d = tmp_path / "out" / "digits" / "local-tiny"
    for rec in recs:
        h = rec["head"]
        alone = [fit(train, h, protocol=TINY, seed=s, progress=False) for s in (3, 4)]
        scores = [p.balanced_accuracy(test) for p in alone]
        assert rec["seeds"] == [3, 4] and rec["n_seeds"] == 2
        assert [r["test_balanced_accuracy"] for r in rec["per_seed"]] == pytest.approx(scores, abs=1e-9)
        assert rec["test_balanced_accuracy"] == pytest.approx(np.mean(scores), abs=1e-9)
        assert rec["test_balanced_accuracy_std"] == pytest.approx(np.std(scores, ddof=1), abs=1e-9)
        for s, probe in zip((3, 4), alone):
            saved = FittedProbe.load(d / (f"{h}_probe" if s == 3 else f"{h}_probe_seed{s}"))
            assert saved.balanced_accuracy(test) == pytest.approx(probe.balanced_accuracy(test), abs=1e-12)
        if h == "alf":
            want = np.mean([p.attention(test) for p in alone], axis=0).mean(axis=1)
            got = np.load(d / "alf_attention.npz")
            np.testing.assert_allclose(got["per_image"], want, rtol=1e-5, atol=1e-7)
            assert list(got["token_names"]) == rec["token_names"]
        else:
            assert not (d / f"{h}_attention.npz").exists()


def test_run_heads_passes_its_arguments_and_writes_its_record(digits_stores, tmp_path, capsys):
    """A named protocol is named in the result, the device asked for is the one used, progress=False prints
    nothing, each seed's time is the time it took, and the file written holds the record returned."""
    import json

    from probes.runner import run_heads

    for s in ("train", "test"):
        put(digits_stores, tmp_path, f"r/{s}.zarr", s)
    (pair,) = discover(tmp_path / "r")
    t0 = time.perf_counter()
    (rec,) = run_heads(pair, ["linear"], "quick", tmp_path / "out", device="cpu:0", progress=False)
    took = time.perf_counter() - t0
    assert capsys.readouterr().err == ""
    assert rec["protocol_name"] == "quick" and rec["device"] == "cpu:0"
    assert 0 < rec["wall_seconds"] < took  # (the first seed's)
    saved = json.loads((tmp_path / "out" / "digits" / "local-tiny" / "linear.json").read_text())
    assert saved == json.loads(json.dumps(rec))


def test_run_heads_on_a_later_rank_returns_every_record_and_writes_nothing(digits_stores, tmp_path, monkeypatch):
    """Under torchrun every rank trains the same heads; rank 0 alone writes the results (files, saved probes),
    and every rank returns all the records."""
    import probes.runner as runner
    from probes.ranks import Ranks

    for s in ("train", "test"):
        put(digits_stores, tmp_path, f"r/{s}.zarr", s)
    (pair,) = discover(tmp_path / "r")
    monkeypatch.setattr(runner, "current_ranks", lambda: Ranks(1, 2))
    recs = runner.run_heads(pair, ["linear", "linear-clsap"], TINY, tmp_path / "out", progress=False)
    assert [r["head"] for r in recs] == ["linear", "linear-clsap"]
    assert not (tmp_path / "out").exists()


def test_run_heads_copies_stores_on_object_storage_into_the_cache_dir(digits_stores, tmp_path):
    """With cache_dir, a pair on object storage is copied there once and read from the copies: the same result
    as the local stores, named by where the stores live."""
    pytest.importorskip("upath")  # object-storage paths (the s3 extra)
    import fsspec

    from probes.runner import run_heads

    fs, name = fsspec.filesystem("memory"), f"rh-{tmp_path.name.lower().replace('_', '-')}"
    for s in ("train", "test"):
        fs.put(str(put(digits_stores, tmp_path, f"r/{s}.zarr", s)), f"/{name}/r/{s}.zarr", recursive=True)
    try:
        (pair,) = discover(f"memory://{name}/r")
        (rec,) = run_heads(pair, ["linear"], TINY, tmp_path / "out", progress=False, cache_dir=tmp_path / "cache")
    finally:
        fs.rm(f"/{name}", recursive=True)
    assert sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache").iterdir()) == ["test.zarr", "train.zarr"]
    (local,) = run_heads(discover(tmp_path / "r")[0], ["linear"], TINY, tmp_path / "out2", progress=False)
    assert rec["test_balanced_accuracy"] == local["test_balanced_accuracy"]
    assert rec["train_store"] == str(pair.train) and str(pair.train).startswith("memory://")


def test_stores_that_record_no_folder_slug(digits_stores, tmp_path):
    """Stores whose dataset records no folder slug (older extractions) pair under the dataset's name, and the
    names offered for an unknown dataset are the recorded ones only."""
    for s in ("train", "test"):
        g = zarr.open_group(str(put(digits_stores, tmp_path, f"d/{s}.zarr", s)), mode="r+")
        attrs = dict(g.attrs)
        attrs["dataset"] = {k: v for k, v in attrs["dataset"].items() if k != "slug"}
        g.attrs.put(attrs)
    (pair,) = discover(tmp_path)
    assert (pair.slug, pair.folder) == ("", "digits")
    with pytest.raises(ProbeError) as e:
        discover(tmp_path, dataset="nope")
    assert str(e.value) == "unknown dataset (in the stores) 'nope' (known: digits)"


def test_run_heads_on_stores_without_an_extraction_record(digits_stores, tmp_path):
    """Stores that record no extraction settings (written before they were recorded) still run; the result
    says the extraction protocol is unknown."""
    from probes.runner import run_heads

    for s in ("train", "test"):
        g = zarr.open_group(str(put(digits_stores, tmp_path, f"r/{s}.zarr", s)), mode="r+")
        g.attrs.put({k: v for k, v in g.attrs.items() if k != "extraction"})
    (pair,) = discover(tmp_path / "r")
    (rec,) = run_heads(pair, ["linear"], TINY, tmp_path / "out", progress=False)
    assert rec["extraction_protocol"] is None and rec["weights_fingerprint"] == MODEL_FP
