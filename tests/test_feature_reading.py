"""What a head receives from a FeatureSet (probes/features.py), against an independent numpy computation: every
token selection (layers, kinds, patches), each normalisation and padding, the model's output projection of the
last layer, rows asked in any order (scattered over chunks, repeated), read from a chunked store or from arrays,
into a caller's buffer or a new one; non-finite tokens refused by row; module taps read through their own arrays."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alfcache.format import StoreError
from probes import FeatureSet
from probes.errors import ProbeError
from probes.selection import TokenSpec

from conftest import add_projection, decode_error, fixture_dir

CHUNK = 64  # rows per chunk of the store: digits' 450 test images make 8 chunks


def reference(cls, ap, patches, rows, layers, kinds, *, with_patches=False, normalise="token", pad="model",
              projection=None):
    """The (n, T, W) tokens written out from their definition, in float64: per layer its kinds in order, then the
    patch tokens; the last layer and the patches through x W^T + b where a projection is given; zero-padded on
    the right to the model's width (pad='model', or wider if the projection is) or to the widest token; then L2
    normalised per token, per channel over the tokens, or not at all."""
    L, D = cls.shape[1], cls.shape[2]
    src = {"cls": np.asarray(cls, np.float64), "ap": np.asarray(ap, np.float64)}
    proj = (lambda t: t @ projection[0].T.astype(np.float64) + projection[1]) if projection else (lambda t: t)
    toks = []
    for layer in layers:
        for k in kinds:
            t = src[k][rows, layer]
            toks.append(proj(t) if layer == L - 1 else t)
    if with_patches:
        toks += [proj(np.asarray(patches, np.float64)[rows, p]) for p in range(patches.shape[1])]
    widest = max(t.shape[1] for t in toks)
    W = max(D, widest) if pad == "model" else widest
    x = np.zeros((len(rows), len(toks), W))
    for i, t in enumerate(toks):
        x[:, i, :t.shape[1]] = t
    if normalise == "token":
        x /= np.maximum(np.linalg.norm(x, axis=2, keepdims=True), 1e-12)
    elif normalise == "across-tokens":
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


@pytest.fixture(scope="module")
def store(tiny_model, tmp_path_factory):
    """digits' test split through the tiny model in 64-row chunks, with patch tokens and module taps."""
    from alfcache.extract import ExtractConfig, extract

    with fixture_dir(tmp_path_factory, "reading") as (out, todo):
        if todo:
            extract(ExtractConfig(model=f"local-dir:{tiny_model}", dataset="digits", splits=["test"], out=out,
                                  workers=0, batch_size=128, chunk_rows=CHUNK, taps="modules", patches=True,
                                  progress=False))
    (path,) = out.rglob("test.zarr")
    return path


@pytest.fixture(scope="module")
def raw(store):
    import zarr

    g = zarr.open_group(str(store), mode="r")
    return {name: g[name][...] for name in ("cls", "ap", "patches")}


# rows across chunk borders (63 | 64), the first and last rows, repeated rows, unsorted
ROWS = np.array([64, 3, 63, 449, 0, 200, 64, 130, 129, 448, 3, 65, 127, 128, 320])

SPECS = [  # (layers given as the spec takes them, the same layers resolved, kinds, patches, normalise)
    ("all", None, "cls+ap", False, "token"),
    ((0, 2), [0, 2], "cls", False, "across-tokens"),
    ((-1,), [-1], "ap", False, "none"),
    ("last", [-1], "cls+ap", True, "token"),
    ("all", None, "cls", True, "none"),  # one kind: the layers' slots are consecutive, the patches right after
    ((1, 3), [1, 3], "cls+ap", True, "across-tokens"),
]


@pytest.mark.parametrize("layers, resolved, kinds, patches, normalise", SPECS)
@pytest.mark.parametrize("in_memory", [False, True])
def test_store_tokens_equal_their_definition(store, raw, layers, resolved, kinds, patches, normalise, in_memory):
    fs = FeatureSet.open(store, in_memory=in_memory)
    L = raw["cls"].shape[1]
    idx = list(range(L)) if resolved is None else [r % L for r in resolved]
    spec = TokenSpec(layers=layers, kinds=kinds, patches=patches, normalise=normalise)
    got = fs.tokens(ROWS, spec)
    want = reference(raw["cls"], raw["ap"], raw["patches"], ROWS, idx, spec.kind_list(), with_patches=patches,
                     normalise=normalise)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    names = [f"{fs.layer_names[i]}:{k}" for i in idx for k in spec.kind_list()]
    names += [f"patch{p}" for p in range(raw["patches"].shape[1])] if patches else []
    assert fs.token_names(spec) == names


@pytest.mark.parametrize("pad", ["model", "widest"])
@pytest.mark.parametrize("E", [3, 8])  # projected narrower than the model (CLIP-L: 1024 -> 768) or wider
@pytest.mark.parametrize("final", ["output", "norm"])
def test_projected_last_layer_and_padding(pad, E, final):
    rng = np.random.default_rng(0)
    N, L, D, P = 30, 3, 5, 2
    cls, ap, patches = (rng.normal(size=s).astype(np.float32) for s in ((N, L, D), (N, L, D), (N, P, D)))
    w, b = rng.normal(size=(E, D)).astype(np.float32), rng.normal(size=E).astype(np.float32)
    fs = FeatureSet.from_arrays(cls=cls, ap=ap, labels=np.arange(N) % 3, patches=patches, projection=(w, b))
    rows = np.array([7, 2, 29, 2, 0])
    for layers, idx in (("all", [0, 1, 2]), ("last", [2]), ((0,), [0]), ((0, 2), [0, 2])):
        spec = TokenSpec(layers=layers, kinds="cls+ap", patches=layers == "all", pad=pad, final=final)
        want = reference(cls, ap, patches, rows, idx, ["cls", "ap"], with_patches=layers == "all", pad=pad,
                         projection=(w, b) if final == "output" else None)
        got = fs.tokens(rows, spec)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=f"{layers} {pad} E={E} {final}")
        assert fs.tokens([], spec).shape == (0, *want.shape[1:])  # no rows (an empty list is float64 to numpy)
        with pytest.raises(ValueError) as e:
            fs.tokens(rows.astype(float), spec)
        assert str(e.value) == "rows must be integer indices, not float64"
        layout = fs.layout(spec)
        assert (layout.width, layout.num_tokens) == want.shape[1:][::-1]
        real = [E if (final == "output" and (i == L - 1)) else D for i in idx for _ in "ka"]
        real += [E if final == "output" else D] * (P if layers == "all" else 0)
        assert layout.widths == real


def test_a_store_without_a_final_norm_layer_is_not_projected(raw):
    """The projection belongs to the model's output: a store whose last layer is not the final norm (an explicit
    module list) reads its last layer as stored even with a projection at hand."""
    from pathlib import Path

    rng = np.random.default_rng(1)
    w, b = rng.normal(size=(3, raw["cls"].shape[2])).astype(np.float32), np.zeros(3, np.float32)
    fs = FeatureSet.from_arrays(cls=raw["cls"], ap=raw["ap"], labels=np.zeros(450, int), projection=(w, b))
    fs.path = Path("a-store.zarr")  # read from a store whose layers are named layer1..layerL
    spec = TokenSpec(layers="last", kinds="cls")
    last = [raw["cls"].shape[1] - 1]
    np.testing.assert_allclose(fs.tokens(ROWS, spec), reference(raw["cls"], raw["ap"], None, ROWS, last, ["cls"]),
                               rtol=2e-5, atol=2e-6)
    fs.layer_names[-1] = "final_norm"
    assert fs.tokens(ROWS, spec).shape[2] == raw["cls"].shape[2]  # padded to the model width, projected inside
    np.testing.assert_allclose(fs.tokens(ROWS, spec)[:, 0, :3],
                               reference(raw["cls"], raw["ap"], None, ROWS, last, ["cls"], projection=(w, b))[:, 0, :3],
                               rtol=2e-5, atol=2e-6)


def test_tokens_into_a_callers_buffer(store, raw):
    """`out`: filled in place (rows asked in sorted order come back as a view of it, nothing copied); any other
    buffer is refused by name."""
    fs = FeatureSet.open(store)
    spec = TokenSpec(layers=(0, 1), kinds="cls+ap")
    rows = np.array([5, 70, 71, 300])
    buf = np.full((10, 4, raw["cls"].shape[2]), 7.0, np.float32)
    got = fs.tokens(rows, spec, out=buf)
    assert np.shares_memory(got, buf) and got.shape == (4, 4, raw["cls"].shape[2])
    np.testing.assert_allclose(buf[:4], reference(raw["cls"], raw["ap"], None, rows, [0, 1], ["cls", "ap"]),
                               rtol=2e-5, atol=2e-6)
    assert (buf[4:] == 7.0).all(), "rows past the asked ones are left alone"
    shuffled = fs.tokens(rows[::-1], spec, out=buf)
    np.testing.assert_array_equal(shuffled, buf[:4][::-1])
    exact = np.empty((4, 4, raw["cls"].shape[2]), np.float32)  # exactly as many rows as asked: enough
    assert np.shares_memory(fs.tokens(rows, spec, out=exact), exact)
    np.testing.assert_array_equal(exact, buf[:4])
    for no_rows in ([], np.array([], np.int32)):  # no rows at all (an empty list is float64 to numpy)
        assert fs.tokens(no_rows, spec).shape == (0, 4, raw["cls"].shape[2])
        assert fs.select_tap(None).tokens(no_rows, spec, out=buf).shape == (0, 4, raw["cls"].shape[2])
    shape = (4, 4, raw["cls"].shape[2])
    for bad in (np.zeros((10, 4, shape[2]), np.float64), np.zeros((3, 4, shape[2]), np.float32),
                np.zeros((10, 5, shape[2]), np.float32), np.zeros((10, 4, shape[2] + 1), np.float32),
                np.zeros((10, 4, 2 * shape[2]), np.float32)[:, :, ::2]):
        with pytest.raises(ValueError) as e:
            fs.tokens(rows, spec, out=bad)
        assert str(e.value) == f"out must be a C-contiguous float32 array of at least {shape}, not {bad.dtype} {bad.shape}"


@pytest.mark.parametrize("normalise", ["token", "across-tokens", "none"])
def test_non_finite_tokens_are_refused_by_row(normalise):
    """+inf, -inf and NaN anywhere in a token a head would see (cls, ap, a patch) name the first three rows (in
    row order) that hold one; rows the head does not see do not matter."""
    rng = np.random.default_rng(2)
    cls, ap, patches = (rng.normal(size=s).astype(np.float32) for s in ((20, 2, 4), (20, 2, 4), (20, 3, 4)))
    cls[11, 1, 2] = np.inf
    ap[4, 0, 0] = -np.inf
    ap[4, 1, 3] = np.nan  # a second channel and token of the same row: the row is named once
    patches[16, 2, 3] = np.nan
    cls[1, 0, 1] = np.nan  # never asked below
    ap[18, 1, 1] = np.nan  # a fourth row asked first: only the first three in row order are named
    fs = FeatureSet.from_arrays(cls=cls, ap=ap, labels=np.arange(20) % 2, patches=patches)
    spec = TokenSpec(kinds="cls+ap", patches=True, normalise=normalise)
    with pytest.raises(ProbeError) as e:
        fs.tokens(np.array([18, 16, 0, 11, 4, 5]), spec)
    assert str(e.value) == "non-finite tokens in rows [4, 11, 16]"
    with pytest.raises(ProbeError) as e:
        fs.tokens(np.array([16, 0, 11, 4, 5]), TokenSpec(kinds="ap", normalise=normalise))
    assert str(e.value) == "non-finite tokens in rows [4]"
    assert np.isfinite(fs.tokens(np.array([0, 5, 19]), spec)).all()
    fs.path = "s.zarr"
    with pytest.raises(ProbeError) as e:
        fs.tokens(np.array([11]), TokenSpec(kinds="cls", layers="last", normalise=normalise))
    assert str(e.value) == "non-finite tokens in rows [11] of 's.zarr'"


def test_float16_overflow_in_a_store_is_refused(store, tmp_path):
    """A token stored as float16 infinity (a value past 65504) is refused like any other."""
    import shutil

    import zarr

    s = tmp_path / "s.zarr"
    shutil.copytree(store, s)
    a = zarr.open_group(str(s), mode="r+")["cls"]
    row = a[130]
    row[0, 0] = np.float16(np.inf) if a.dtype == np.float16 else np.inf
    a[130] = row
    fs = FeatureSet.open(s)
    with pytest.raises(ProbeError) as e:
        fs.tokens(np.array([129, 130]), TokenSpec(layers=(0,), kinds="cls"))
    assert str(e.value) == f"non-finite tokens in rows [130] of '{s}'"


def test_module_taps_read_their_own_arrays(store):
    """Through a module tap the tokens are that tap's cls / ap / mean arrays over the blocks, and the layer names
    say so; unknown taps, 'mean' outside a tap and patch tokens a set lacks are refused by name."""
    import zarr

    fs = FeatureSet.open(store)
    g = zarr.open_group(str(store), mode="r")
    kind = fs.module_taps[0]
    tap = fs.select_tap(kind)
    assert tap.layer_names == [f"block{i}.{kind}" for i in range(g[f"modules/{kind}/cls"].shape[1])]
    assert fs.select_tap("main") is fs and fs.select_tap(None) is fs and fs.select_tap("") is fs
    n_blocks, width = g[f"modules/{kind}/cls"].shape[1:]
    assert (tap.meta["num_layers"], tap.meta["width"], tap.num_layers) == (n_blocks, width, n_blocks)
    other = FeatureSet.open(store)
    other.meta = {**other.meta, "num_layers": -1, "width": -1}  # the tap's facts are its own, not the store's
    assert (other.select_tap(kind).meta["num_layers"], other.select_tap(kind).meta["width"]) == (n_blocks, width)
    assert tap.meta["taps"] == {**fs.meta["taps"], "modules": fs.meta["taps"]["module_taps"][kind],
                                "layer_names": tap.layer_names, "selected_tap": kind}
    assert fs.meta["taps"].get("selected_tap") is None  # the store's own view is left alone
    assert tap.path == fs.path and tap.select_tap(kind).layer_names == tap.layer_names  # read from the same store
    for kinds, arrays in (("cls+ap", ("cls", "ap")), ("mean", ("mean",))):
        spec = TokenSpec(kinds=kinds, normalise="none")
        want = np.stack([g[f"modules/{kind}/{a}"][...][ROWS, layer] for layer in range(len(tap.layer_names))
                         for a in arrays], axis=1).astype(np.float32)
        np.testing.assert_array_equal(tap.tokens(ROWS, spec), want)
    with pytest.raises(ProbeError) as e:
        fs.tokens(ROWS, TokenSpec(kinds="mean"))
    assert str(e.value) == "token kind 'mean' (all tokens) exists for module taps only; choose a --tap"
    with pytest.raises(ProbeError) as e:
        tap.tokens(ROWS, TokenSpec(patches=True))
    assert str(e.value) == "this head needs last-layer patch tokens; extract with --patches"
    with pytest.raises(ProbeError) as e:
        fs.select_tap("no-such-tap")
    assert str(e.value).startswith("unknown tap 'no-such-tap'") and kind in str(e.value)
    with pytest.raises(ProbeError) as e:
        FeatureSet.from_arrays(cls=np.zeros((2, 1, 3)), labels=[0, 1]).select_tap(kind)
    assert str(e.value) == f"unknown tap '{kind}' (known: (store has no module taps; extract with --taps modules))"
    arrays = FeatureSet.from_arrays(cls=np.zeros((2, 1, 3)), labels=[0, 1], meta={"taps": {"module_taps": {kind: []}}})
    with pytest.raises(ProbeError) as e:
        arrays.select_tap(kind)
    assert str(e.value) == "module taps are read from a store; this feature set was built from arrays"


@pytest.mark.parametrize("normalise", ["token", "across-tokens"])
def test_tiny_tokens_normalise_to_unit_length_and_zero_ones_stay_zero(normalise):
    """Normalising divides by the norm itself down to 1e-12 (a token of norm 1e-7 still becomes a unit vector);
    an all-zero token stays zero rather than becoming NaN."""
    rng = np.random.default_rng(3)
    cls = rng.normal(size=(4, 2, 5)).astype(np.float32)
    cls[1] *= 1e-7
    cls[2] = 0
    fs = FeatureSet.from_arrays(cls=cls, labels=[0, 1, 0, 1])
    got = fs.tokens(np.arange(4), TokenSpec(kinds="cls", normalise=normalise))
    np.testing.assert_allclose(got, reference(cls, cls, None, np.arange(4), [0, 1], ["cls"], normalise=normalise),
                               rtol=1e-5, atol=1e-6)
    axis = 2 if normalise == "token" else 1
    np.testing.assert_allclose(np.linalg.norm(got[1], axis=axis - 1), 1.0, rtol=1e-5)
    assert (got[2] == 0).all()


class Unreadable:
    """An array-like whose reads fail with `error`, named as zarr (`path`) or h5py (`name`) names arrays."""

    def __init__(self, error, **names):
        self.error, self.shape = error, (10, 2, 4)
        self.__dict__.update(names)

    def __getitem__(self, sel):
        raise self.error


@pytest.mark.parametrize("arr, sel, name, want", [
    (Unreadable(ValueError("bad blosc\nframe"), path="cls"), slice(3, 7), None,
     "rows 3-6 of 'cls' cannot be read (ValueError: bad blosc)"),
    (Unreadable(OSError("crc"), name="/modules/ffn/ap"), slice(0, 1), None,
     "rows 0-0 of 'modules/ffn/ap' cannot be read (OSError: crc)"),
    (Unreadable(KeyError(), path=None, name="/labels"), Ellipsis, None, "'labels' cannot be read (KeyError: no detail)"),
    (Unreadable(RuntimeError("x")), slice(None), None, "'?' cannot be read (RuntimeError: x)"),
    (Unreadable(RuntimeError("x"), path="cls"), slice(2, None), "projection/weight",
     "'projection/weight' cannot be read (RuntimeError: x)"),
], ids=["zarr-path", "h5py-name", "no-detail", "unnamed", "name-given"])
def test_a_read_that_fails_names_the_rows_the_array_and_the_cause(arr, sel, name, want):
    """The one 'damaged' line of a read that fails: the rows (for a bounded range), the array (the name given,
    else zarr's path, else h5py's name without its leading slash, else '?'), the error's type and first line."""
    from probes.features import _read

    with pytest.raises(StoreError) as e:
        _read(arr, sel, Path("/d/s.zarr"), name)
    assert str(e.value) == f"store '/d/s.zarr' is damaged: {want}; re-extract it with --overwrite"


def test_a_read_refused_by_object_storage_is_the_access_line():
    pytest.importorskip("upath")  # object-storage paths (the s3 extra)
    from alfcache.format import location
    from probes.features import _read

    url = location("memory://bkt-read-access/s.zarr")
    with pytest.raises(StoreError) as e:
        _read(Unreadable(PermissionError(13, "Forbidden", "bkt-read-access/s.zarr/cls/c/0"), path="cls"),
              slice(0, 4), url)
    assert str(e.value).startswith("object storage: access denied '") and str(e.value).endswith(f"[{url}]")


def test_from_arrays_defaults_and_refusals():
    """Feature sets from arrays: either token kind alone (the other reads as zeros), labels as int64, default
    class and layer names, no rows at all; each misfit refused in its own words; the layer count and width
    recorded so that pairing names which one differs."""
    from probes.features import check_compatible

    rng = np.random.default_rng(0)
    ap = rng.normal(size=(6, 3, 4)).astype(np.float32)
    fs = FeatureSet.from_arrays(ap=ap, labels=[0.0, 1.0, 2.0, 0.0, 1.0, 2.0])
    assert np.array_equal(fs.ap, ap) and np.array_equal(fs.cls, np.zeros_like(ap)) and fs.cls.dtype == ap.dtype
    assert fs.labels.dtype == np.int64 and fs.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert fs.class_names == ["0", "1", "2"] and fs.layer_names == ["layer1", "layer2", "layer3"]
    assert (fs.meta["num_layers"], fs.meta["width"]) == (3, 4)
    named = FeatureSet.from_arrays(ap=ap, labels=np.zeros(6), layer_names=("a", "b", "c"), class_names=("x",))
    assert (named.layer_names, named.class_names) == (["a", "b", "c"], ["x"])  # given names kept, as lists
    assert np.array_equal(FeatureSet.from_arrays(cls=ap, labels=np.zeros(6)).cls, ap)
    empty = FeatureSet.from_arrays(cls=np.zeros((0, 2, 4), np.float32), labels=[])
    assert (len(empty), empty.class_names) == (0, [])

    def refused(**kw) -> str:
        with pytest.raises(ProbeError) as e:
            FeatureSet.from_arrays(**kw)
        return str(e.value)

    assert refused(labels=[0]) == "from_arrays needs cls and/or ap arrays of shape (N, L, D)"
    assert refused(cls=np.zeros((2, 4)), labels=[0, 1]) == "token arrays must be (N, L, D), got (2, 4)"
    assert refused(cls=ap, ap=ap[:, :2], labels=np.zeros(6)) == \
        "shapes do not fit: cls (6, 3, 4), ap (6, 2, 4), labels (6,)"
    assert refused(cls=ap, labels=np.zeros(5)) == "shapes do not fit: cls (6, 3, 4), ap (6, 3, 4), labels (5,)"
    w, b = np.zeros((5, 4)), np.zeros(5)
    assert FeatureSet.from_arrays(cls=ap, labels=np.zeros(6), projection=(w, b)).projection[0].shape == (5, 4)
    assert refused(cls=ap, labels=np.zeros(6), projection=(w, np.zeros(3))) == \
        "projection weight (5, 4) / bias (3,) do not fit tokens of width 4"
    assert refused(cls=ap, labels=np.zeros(6), projection=(np.zeros((5, 3)), b)) == \
        "projection weight (5, 3) / bias (5,) do not fit tokens of width 4"
    # pairing names the layer count or the width that differs
    for other, what in ((ap[:, :2], "layers"), (ap[:, :, :3], "width, token shape")):
        with pytest.raises(ProbeError) as e:
            check_compatible(fs, FeatureSet.from_arrays(ap=other, labels=fs.labels))
        assert str(e.value) == f"train and test features do not fit together: {what} differ"


def test_open_an_incomplete_store_its_labels_and_its_projection(store, tmp_path):
    """FeatureSet.open: an incomplete store (chunks not yet written) opens when allowed - its missing chunks are
    what incomplete means - while the same store marked complete is refused; labels that cannot be decoded are
    one 'damaged' line naming the cause; a recorded output projection is read."""
    import shutil

    import zarr

    from alfcache.format import read_metadata

    def copy(name):
        dst = tmp_path / name / "test.zarr"
        shutil.copytree(store, dst)
        return dst, zarr.open_group(str(dst), mode="r+")

    half, g = copy("half")
    for f in [p for p in half.rglob("*") if p.is_file() and "c" in p.relative_to(half).parts]:
        parts = f.relative_to(half).parts
        if parts[parts.index("c") + 1] == "7":  # the last chunk of every array
            f.unlink()
    g.attrs.put({**g.attrs, "complete": False})
    assert len(FeatureSet.open(half, allow_incomplete=True).labels) == read_metadata(half)["num_samples"]
    g.attrs.put({**g.attrs, "complete": True})
    with pytest.raises(StoreError, match=r"has no data on disk for rows 448-449"):
        FeatureSet.open(half)

    bad, g = copy("labels")
    chunk = bad / "labels" / "c" / "0"
    chunk.write_bytes(chunk.read_bytes()[:5])
    kind = decode_error(bad, "labels", slice(None))
    with pytest.raises(StoreError) as e:
        FeatureSet.open(bad)
    assert str(e.value) == f"store '{bad}' is damaged: its labels cannot be read ({kind}); re-extract it with --overwrite"

    proj, _ = copy("proj")
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(3, 32)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    add_projection(proj, w, b)
    got = FeatureSet.open(proj).projection
    assert np.array_equal(got[0], w) and np.array_equal(got[1], b)
    assert FeatureSet.open(store).projection is None


def test_reads_on_opening_name_the_array_that_fails(store, tmp_path):
    """A token array read whole (in_memory) or a projection that cannot be decoded is one 'damaged' line naming
    that array in that store."""
    import shutil

    whole = FeatureSet.open(store, in_memory=True)
    assert all(isinstance(a, np.ndarray) for a in (whole.cls, whole.ap, whole.patches))
    for name in ("cls", "ap", "patches", "projection/weight"):
        s = tmp_path / name.replace("/", "-") / "test.zarr"
        shutil.copytree(store, s)
        if name.startswith("projection"):
            add_projection(s, np.ones((3, 32), np.float32), np.ones(3, np.float32))
        chunk = next(p for p in sorted((s / name / "c").rglob("*")) if p.is_file())
        chunk.write_bytes(chunk.read_bytes()[:7])
        kind = decode_error(s, name, Ellipsis)
        with pytest.raises(StoreError) as e:
            FeatureSet.open(s, in_memory=True)
        assert str(e.value).startswith(f"store '{s}' is damaged: '{name}' cannot be read ({kind}: ")


def test_a_feature_set_says_what_it_holds(store):
    """repr: dataset / model, split, rows x layers x width, classes, patch tokens and the store, or what an
    array-built set lacks."""
    fs = FeatureSet.open(store)
    m = fs.meta
    assert repr(fs) == (f"FeatureSet({m['dataset']['name']} / {m['model']['name']} {m['split']}: {len(fs)} rows x "
                        f"{fs.num_layers} layers x {fs.width}, {len(fs.class_names)} classes, {fs.num_patches} patch "
                        f"tokens, store '{store}')")
    bare = FeatureSet.from_arrays(cls=np.zeros((3, 2, 4)), labels=[0, 1, -1])
    assert repr(bare) == "FeatureSet(arrays / -: 2 rows x 2 layers x 4, 2 classes)"
