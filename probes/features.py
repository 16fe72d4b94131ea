"""FeatureSet: per-layer CLS/AP tokens + labels, from a store (memory-mapped) or from numpy arrays.

Stores are read through the store contract (`alfcache.format`, numpy/zarr/h5py only), trusting their metadata.
Opening a store reads metadata and labels only (both checked); token rows are read on demand, chunk by chunk.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import alfcache.format as store_format
from alfcache.format import (PAIR_KEYS, StoreError, check_intact, check_labels, damaged, get, open_arrays,  # noqa: F401
                             read_metadata, verify_store)  # (StoreError, verify_store: re-exported for probe users)

from .errors import ProbeError
from .selection import TokenLayout, TokenSpec, resolve_layers


@dataclass
class FeatureSet:
    cls: object  # (N, L, D) numpy array, zarr array or h5py dataset
    ap: object
    labels: np.ndarray  # (N,) int64; rows with label < 0 (skipped images) are excluded via `rows`
    class_names: list[str]
    layer_names: list[str]
    patches: object | None = None  # (N, P, D) last-layer patch tokens, optional
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    chunk_rows: int = 4096
    _handle: object = None
    mean: object | None = None  # (N, L, D) mean over all tokens (module taps only)
    projection: tuple[np.ndarray, np.ndarray] | None = None  # the model's output projection (E, D), (E,)

    def __repr__(self) -> str:
        m = self.meta
        name = f"{m.get('dataset', {}).get('name', 'arrays')} / {m.get('model', {}).get('name', '-')}"
        split = f" {m['split']}" if m.get("split") else ""
        extra = f", {self.num_patches} patch tokens" if self.patches is not None else ""
        where = f", store '{self.path}'" if self.path else ""
        return (f"FeatureSet({name}{split}: {len(self)} rows x {self.num_layers} layers x {self.width}, "
                f"{len(self.class_names)} classes{extra}{where})")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_arrays(klass, *, cls=None, ap=None, labels, class_names=None, layer_names=None, patches=None,
                    meta=None, projection=None) -> "FeatureSet":
        """Build from (N, L, D) `cls` and/or `ap` arrays, (N,) labels and optional (N, P, D) patches; `projection`
        = (weight (E, D), bias (E,)): the model's output projection of the last layer (as CLIP's visual.proj)."""
        cls_tokens = cls
        if cls_tokens is None and ap is None:
            raise ProbeError("from_arrays needs cls and/or ap arrays of shape (N, L, D)")
        ref = cls_tokens if cls_tokens is not None else ap
        ref = np.asarray(ref)
        if ref.ndim != 3:
            raise ProbeError(f"token arrays must be (N, L, D), got {ref.shape}")
        cls_tokens = np.asarray(cls_tokens) if cls_tokens is not None else np.zeros_like(ref)
        ap = np.asarray(ap) if ap is not None else np.zeros_like(ref)
        labels = np.asarray(labels, dtype=np.int64)
        if cls_tokens.shape != ap.shape or len(labels) != ref.shape[0]:
            raise ProbeError(f"shapes do not fit: cls {cls_tokens.shape}, ap {ap.shape}, labels {labels.shape}")
        n_cls = int(labels.max()) + 1 if len(labels) else 0
        class_names = list(class_names) if class_names is not None else [str(c) for c in range(n_cls)]
        layer_names = list(layer_names) if layer_names is not None else [f"layer{i + 1}" for i in range(ref.shape[1])]
        if patches is not None:
            patches = np.asarray(patches)
        meta = dict(meta or {})
        meta.setdefault("num_layers", ref.shape[1])
        meta.setdefault("width", ref.shape[2])
        meta.setdefault("class_names", class_names)
        if projection is not None:
            projection = tuple(np.asarray(a, dtype=np.float32) for a in projection)
            if projection[0].shape[1:] != (ref.shape[2],) or projection[1].shape != projection[0].shape[:1]:
                raise ProbeError(f"projection weight {projection[0].shape} / bias {projection[1].shape} do not fit "
                                 f"tokens of width {ref.shape[2]}")
        return klass(cls_tokens, ap, labels, class_names, layer_names, patches, meta, projection=projection)

    @classmethod
    def open(klass, path: str | Path, *, in_memory: bool = False, allow_incomplete: bool = False,
             cache_dir: str | Path | None = None) -> "FeatureSet":
        """Open a store lazily (memory-mapped chunks); `in_memory=True` reads the token arrays into RAM. `path`
        may be on object storage (s3://bucket/...: chunks are read with several requests in flight); with
        `cache_dir` a complete remote store is copied there once and read locally (a read-through cache).

        Every array the store lists must open with the recorded shape and dtype, and (complete stores) hold data
        for every chunk: a chunk missing on disk would read as fill values, so it is refused whether or not the
        checksums are verified. Labels are checked against the class list. A chunk that cannot be decoded later
        is one 'damaged' StoreError too."""
        path = store_format.location(path)
        meta = read_metadata(path)
        if cache_dir is not None and store_format.is_remote(path) and meta.get("complete"):
            fs = klass.open(store_format.mirror_store(path, cache_dir, meta), in_memory=in_memory)
            fs.path = path  # named by where it lives; read from the local copy
            return fs
        if not meta.get("complete") and not allow_incomplete:
            raise ProbeError(f"store '{path}' is incomplete (extraction did not finish); rerun the extraction to "
                             f"resume it, or pass allow_incomplete / --allow-incomplete")
        arrays = open_arrays(path, meta)
        try:
            check_intact(path, meta, arrays.handle, chunks=bool(meta.get("complete")))
            labels = np.asarray(arrays["labels"][:], dtype=np.int64)
        except StoreError:
            arrays.close()
            raise
        except Exception as e:  # a labels chunk that does not decode
            arrays.close()
            raise damaged(path, f"its labels cannot be read ({type(e).__name__})") from None
        if meta.get("complete"):
            check_labels(labels, meta, path)
        projection = None
        if meta.get("projection"):
            projection = tuple(np.asarray(_read(arrays[name], ..., path, name), dtype=np.float32)
                               for name in store_format.PROJECTION)
        fs = klass(arrays["cls"], arrays["ap"], labels, list(meta["class_names"]), list(meta["taps"]["layer_names"]),
                   arrays["patches"] if "patches" in arrays else None, meta, path, int(meta.get("chunk_rows", 4096)),
                   arrays, projection=projection)
        if in_memory:
            fs.cls, fs.ap = _read(fs.cls, slice(None), path, "cls"), _read(fs.ap, slice(None), path, "ap")
            if fs.patches is not None:
                fs.patches = _read(fs.patches, slice(None), path, "patches")
        return fs

    @property
    def module_taps(self) -> list[str]:
        """Module kinds stored beside the main layers (tap set `modules`)."""
        return list(self.meta.get("taps", {}).get("module_taps", {}))

    def select_tap(self, kind: str) -> "FeatureSet":
        """The same rows seen through one module tap: its cls / ap / mean arrays over all blocks."""
        if kind in (None, "", "main"):
            return self
        if kind not in self.module_taps:
            from .errors import unknown_name

            raise unknown_name("tap", kind, self.module_taps or ["(store has no module taps; extract with --taps modules)"])
        if self._handle is None:
            raise ProbeError("module taps are read from a store; this feature set was built from arrays")
        cls_, ap_, mean_ = (self._handle[f"modules/{kind}/{n}"] for n in ("cls", "ap", "mean"))
        n_blocks = cls_.shape[1]
        meta = dict(self.meta)
        meta["num_layers"], meta["width"] = n_blocks, int(cls_.shape[2])
        meta["taps"] = {**self.meta.get("taps", {}), "modules": self.meta["taps"]["module_taps"][kind],
                        "layer_names": [f"block{i}.{kind}" for i in range(n_blocks)], "selected_tap": kind}
        return FeatureSet(cls_, ap_, self.labels, self.class_names, meta["taps"]["layer_names"], None, meta,
                          self.path, self.chunk_rows, self._handle, mean_)

    # ------------------------------------------------------------------ facts
    @property
    def num_layers(self) -> int:
        return int(self.cls.shape[1])

    @property
    def width(self) -> int:
        return int(self.cls.shape[2])

    @property
    def num_patches(self) -> int:
        return 0 if self.patches is None else int(self.patches.shape[1])

    @property
    def rows(self) -> np.ndarray:
        """Usable rows: images that were read (skipped ones carry label -1)."""
        return np.flatnonzero(self.labels >= 0)

    def __len__(self) -> int:
        return len(self.rows)

    def token_names(self, spec: TokenSpec) -> list[str]:
        return spec.token_names(self.layer_names, self.num_patches)

    def _projects(self, spec: TokenSpec) -> bool:
        """Does the spec see the last layer through the model's output projection? (Only when that layer is the
        model's final norm: a store of an explicit module list has no output layer.)"""
        final = self.path is None or (self.layer_names and self.layer_names[-1] == "final_norm")
        return spec.final == "output" and self.projection is not None and bool(final)

    def layout(self, spec: TokenSpec) -> TokenLayout:
        """Names, real widths and the padded width W of the (T, W) tokens `tokens(rows, spec)` returns."""
        names = self.token_names(spec)
        layers = resolve_layers(self.num_layers, spec.layers)
        D = self.width
        E = int(self.projection[0].shape[0]) if self._projects(spec) else D
        last = self.num_layers - 1
        widths = [E if l == last else D for l in layers for _ in spec.kind_list()]
        widths += [E] * (self.num_patches if spec.patches else 0)
        width = max(D, *widths) if spec.pad == "model" else max(widths)
        return TokenLayout(names, widths, width)

    # ------------------------------------------------------------------ reading
    def tokens(self, rows: np.ndarray, spec: TokenSpec, out: np.ndarray | None = None) -> np.ndarray:
        """(len(rows), T, W) float32 tokens for the given rows, in the spec's interleaved order, normalised and
        zero-padded on the right where a token is narrower than W (see `layout`).

        The last layer (and the patch tokens) pass through the model's output projection when the spec asks for
        the model's output and the store has one (CLIP). Rows are read in sorted order, one read per touched
        chunk, each block converted straight into its slots of one float32 output; then put back in the asked
        order. `out`: a float32 buffer with at least len(rows) rows to fill instead of a new array (a streaming
        reader reuses its buffers: first touches of fresh memory cost more than the decoding on some machines).
        """
        rows = np.asarray(rows)
        if len(rows) and rows.dtype.kind not in "iu":  # (an empty list is float64 to numpy: no rows is fine)
            raise ValueError(f"rows must be integer indices, not {rows.dtype}")
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        if spec.kinds == "mean" and self.mean is None:
            raise ProbeError("token kind 'mean' (all tokens) exists for module taps only; choose a --tap")
        if spec.patches and self.patches is None:
            raise ProbeError("this head needs last-layer patch tokens; extract with --patches")
        layout = self.layout(spec)
        shape = (len(srt), layout.num_tokens, layout.width)
        if out is None:
            out = np.empty(shape, np.float32)
        elif out.dtype != np.float32 or out.shape[1:] != shape[1:] or len(out) < len(srt) or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of at least {shape}, not {out.dtype} {out.shape}")
        out = out[:len(srt)]
        if not len(srt):
            return out  # no rows: nothing to read (torch cannot infer a view's width from 0 elements)
        self._fill(out, srt, spec, layout.padded)
        self._normalise(out, srt, spec.normalise)
        if np.array_equal(order, np.arange(len(order))):
            return out  # asked in sorted order already: no reordering copy
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        return out[inv]

    def _fill(self, out: np.ndarray, srt: np.ndarray, spec: TokenSpec, padded: bool) -> None:
        """Copy the sorted rows' tokens into `out` (T slots, padded width), projecting the final layer and the
        patch tokens when the spec reads the model's output."""
        import torch  # float16 -> float32 copies in torch: ~9x faster than numpy's cast

        layers = resolve_layers(self.num_layers, spec.layers)
        kinds = spec.kind_list()
        K, L, D = len(kinds), len(layers), self.width
        x = torch.from_numpy(out)
        if padded:
            x.zero_()
        project = None
        if self._projects(spec):
            w, b = (torch.from_numpy(a) for a in self.projection)
            project = lambda t: torch.addmm(b, t.reshape(-1, D), w.t()).view(*t.shape[:-1], -1)  # noqa: E731
        last = self.num_layers - 1
        plain = [l for l in layers if not (project is not None and l == last)]
        for j, k in enumerate(kinds):  # cls+ap interleaves [CLS_1, AP_1, CLS_2, ...]
            arr = getattr(self, k)
            if plain:
                slots = [layers.index(l) * K + j for l in plain]
                sl = slice(slots[0], slots[-1] + 1, K)  # every K-th slot: this kind's over the plain layers
                for pos, block in self._blocks(arr, srt, plain):
                    x[pos:pos + len(block), sl, :D].copy_(torch.from_numpy(np.ascontiguousarray(block)))
            if len(plain) < L:  # the projected last layer
                slot = layers.index(last) * K + j
                for pos, block in self._blocks(arr, srt, [last]):
                    t = project(torch.from_numpy(np.ascontiguousarray(block[:, 0])).float())
                    x[pos:pos + len(block), slot, :t.shape[-1]].copy_(t)
        if spec.patches:
            for pos, block in self._blocks(self.patches, srt, None):
                t = torch.from_numpy(np.ascontiguousarray(block)).float()
                t = project(t) if project is not None else t
                x[pos:pos + len(block), L * K:, :t.shape[-1]].copy_(t)

    def _normalise(self, out: np.ndarray, srt: np.ndarray, how: str) -> None:
        """L2-normalise in place: each token, or each channel over the tokens ("across-tokens", the authors'
        all-token features: F.normalize(dim=1) of an (N, T, D) tensor); refuse non-finite tokens."""
        import torch

        x = torch.from_numpy(out)
        norms = torch.linalg.vector_norm(x, dim=1 if how == "across-tokens" else -1, keepdim=True)
        bad = ~torch.isfinite(norms).flatten(1).all(dim=1)  # non-finite iff some element is
        if bool(bad.any()):
            rows_bad = srt[bad.nonzero()[:, 0].numpy()[:3]]
            raise ProbeError(f"non-finite tokens in rows {rows_bad.tolist()}" + (f" of '{self.path}'" if self.path else ""))
        if how != "none":
            x.div_(norms.clamp_min_(1e-12))

    def _blocks(self, arr, sorted_rows: np.ndarray, layers):
        """(position in sorted_rows, rows block) pieces of a numpy array or a chunked store array; for the
        latter one read per touched chunk (the span of the asked rows inside it), so scattered rows never
        decompress a chunk twice."""
        if layers is not None and list(layers) == list(range(arr.shape[1])):
            layers = None  # every layer: no fancy-index copy
        if isinstance(arr, np.ndarray):
            sel = arr[sorted_rows]
            yield 0, (sel[:, layers] if layers is not None else sel)
            return
        chunk = sorted_rows // self.chunk_rows
        parts = np.split(sorted_rows, np.flatnonzero(np.diff(chunk)) + 1) if len(sorted_rows) else []
        ahead = store_format.read_ahead(self.path) if self.path is not None else 1
        read = lambda part: _read(arr, slice(int(part[0]), int(part[-1]) + 1), self.path)  # noqa: E731
        pos = 0
        for part, block in zip(parts, store_format.prefetched(read, parts, ahead)):
            a, b = int(part[0]), int(part[-1]) + 1
            if b - a != len(part):
                block = block[part - a]
            yield pos, (block[:, layers] if layers is not None else block)
            pos += len(part)


def _read(arr, sel, path, name: str | None = None) -> np.ndarray:
    """arr[sel] of a store array as numpy; a chunk that cannot be decoded (truncated or overwritten on disk) is
    the one-line 'damaged' error naming the store, not a codec's traceback."""
    try:
        return np.asarray(arr[sel])
    except Exception as e:
        store_format.access_error(path, e)  # object storage out of reach: that, not 'damaged'
        name = name or getattr(arr, "path", None) or getattr(arr, "name", "?")
        rows = f"rows {sel.start}-{sel.stop - 1} of " if isinstance(sel, slice) and sel.stop is not None else ""
        raise damaged(path, f"{rows}'{str(name).lstrip('/')}' cannot be read ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def check_compatible(train: FeatureSet, test: FeatureSet) -> None:
    """Refuse train/test feature sets that do not fit together, naming the mismatch."""
    bad = []
    for key, what in PAIR_KEYS:
        a, b = get(train.meta, key), get(test.meta, key)
        if a is None and b is None:
            continue
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            bad.append(what)
    if (train.num_layers, train.width) != (test.num_layers, test.width) and "layers" not in bad:
        bad.append("token shape")
    if bad:
        where = f" ('{train.path}' vs '{test.path}')" if train.path else ""
        raise ProbeError(f"train and test features do not fit together: {', '.join(bad)} differ{where}")
