"""Image sources for extraction: `digits` (scikit-learn's bundled real data), `imagefolder:<path>`, the paper's
datasets by short name (CLIP-benchmark web datasets on the Hugging Face hub) and `hf:<dataset>`.

A source is one split of one dataset: it knows its length, class names, how to load image i as an RGB PIL image
(`images.py`), its label, a stable sample id, and the dataset's identity: `source` (where it really comes from,
resolved: an absolute folder, a hub repo and revision) and `index_fingerprint` (the whole dataset's index, the
same for every split), which is what train and test stores are paired by - never the name as typed.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import AlfError, unknown_name
from .format import safe_component
from .images import to_rgb

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class ImageSource:
    """One split of a dataset. Subclasses implement `_load` and fill the fields."""

    dataset: str
    split: str
    class_names: list[str]
    labels: np.ndarray  # (N,) int64
    source: str  # resolved origin of the dataset (recorded; pairing compares it)
    exif: bool = True  # apply EXIF orientation (the paper protocol turns it off for the authors' datasets)

    def __len__(self) -> int:
        return len(self.labels)

    def sample_id(self, i: int) -> str:
        raise NotImplementedError

    def _load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def load(self, i: int) -> Image.Image:
        """Image i as 8-bit RGB (`images.to_rgb`: EXIF orientation, high bit depths scaled, other modes converted)."""
        try:
            img = self._load(i)
            img.load()
            return to_rgb(img, self.exif)
        except AlfError:
            raise
        except Exception as e:
            raise AlfError(f"cannot read image {self.sample_id(i)}: {type(e).__name__}: {e}".splitlines()[0]) from None

    def fingerprint(self) -> str:
        """Content identity of the split's index: ids and labels (not pixel bytes)."""
        h = hashlib.sha256()
        for i in range(len(self)):
            h.update(f"{self.sample_id(i)}\t{int(self.labels[i])}\n".encode())
        return "sha256:" + h.hexdigest()

    def index_fingerprint(self) -> str:
        """Identity of the whole dataset (all splits): equal for the train and test split of one dataset."""
        raise NotImplementedError

    def identity(self) -> dict:
        return {"source": self.source, "index_fingerprint": self.index_fingerprint(), "fingerprint": self.fingerprint()}


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode() + b"\0")
    return "sha256:" + h.hexdigest()


class DigitsSource(ImageSource):
    """scikit-learn's handwritten digits (1797 real 8x8 scans), rendered as RGB images.

    Split: deterministic stratified 75/25 train/test (random_state=0).
    """

    def __init__(self, split: str):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        idx = np.arange(len(d.target))
        tr, te = train_test_split(idx, test_size=0.25, stratify=d.target, random_state=0)
        rows = {"train": np.sort(tr), "test": np.sort(te)}.get(split)
        if rows is None:
            raise unknown_name("split", split, ["train", "test"], hint="dataset 'digits'")
        self.dataset, self.split, self.source = "digits", split, "sklearn:load_digits"
        self.class_names = [str(c) for c in d.target_names]
        self._all_targets = d.target
        self._rows = rows
        self._images = (d.images[rows] * (255.0 / 16.0)).round().astype(np.uint8)
        self.labels = d.target[rows].astype(np.int64)

    def sample_id(self, i: int) -> str:
        return f"digits/{int(self._rows[i])}"

    def index_fingerprint(self) -> str:
        return _sha("stratified 75/25, random_state 0", np.asarray(self._all_targets).tobytes().hex())

    def _load(self, i: int) -> Image.Image:
        return Image.fromarray(self._images[i], mode="L")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


class ImageFolderSource(ImageSource):
    """`root/<split>/<class>/*` or, without split folders, `root/<class>/*` split by a stratified ratio."""

    def __init__(self, root: str | Path, split: str, *, test_ratio: float = 0.2, seed: int = 0):
        root = Path(root)
        if not root.is_dir():
            raise AlfError(f"image folder '{root}' does not exist")
        root = root.resolve()
        self.dataset, self.split, self.source = f"imagefolder:{root}", split, f"imagefolder:{root}"
        self._root = root
        if (root / "train").is_dir():
            classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
            split_dir = root / split
            if not split_dir.is_dir():
                have = sorted(p.name for p in root.iterdir() if p.is_dir())
                raise unknown_name("split", split, have, hint=f"folders of '{root}'")
            extra = sorted({p.name for p in split_dir.iterdir() if p.is_dir()} - set(classes))
            if extra:
                raise AlfError(f"split '{split}' of '{root}' has classes missing from train: {', '.join(extra)}")
            files, labels = [], []
            for c, name in enumerate(classes):
                found = _list_images(split_dir / name) if (split_dir / name).is_dir() else []
                files += found
                labels += [c] * len(found)
            base = split_dir
        else:
            from sklearn.model_selection import train_test_split

            classes = sorted(p.name for p in root.iterdir() if p.is_dir())
            all_files, all_labels = [], []
            for c, name in enumerate(classes):
                found = _list_images(root / name)
                all_files += found
                all_labels += [c] * len(found)
            if split not in ("train", "test"):
                raise unknown_name("split", split, ["train", "test"], hint=f"'{root}' has no split folders")
            if len(all_files) < 2:
                raise AlfError(f"image folder '{root}' holds fewer than 2 images")
            idx = np.arange(len(all_files))
            tr, te = train_test_split(idx, test_size=test_ratio, stratify=all_labels, random_state=seed)
            keep = np.sort(tr if split == "train" else te)
            files = [all_files[i] for i in keep]
            labels = [all_labels[i] for i in keep]
            base = root
        if not classes:
            raise AlfError(f"image folder '{root}' has no class folders")
        if not files:
            raise AlfError(f"split '{split}' of '{root}' holds no images")
        empty = [c for i, c in enumerate(classes) if not np.any(np.asarray(labels) == i)]
        if empty and split == "train":
            raise AlfError(f"class{'es' if len(empty) > 1 else ''} {', '.join(repr(c) for c in empty)} of '{root}' "
                           f"{'have' if len(empty) > 1 else 'has'} no images in split 'train'")
        self.class_names = classes
        self._files = files
        self._base = base
        self.labels = np.asarray(labels, dtype=np.int64)

    def sample_id(self, i: int) -> str:
        return str(self._files[i].relative_to(self._base))

    def _load(self, i: int) -> Image.Image:
        return Image.open(self._files[i])

    def index_fingerprint(self) -> str:
        """Every image file under the root (relative path, size) and the split rule."""
        rule = "split folders" if (self._root / "train").is_dir() else "stratified 80/20, random_state 0"
        files = [(str(p.relative_to(self._root)), p.stat().st_size) for p in _list_images(self._root)]
        return _sha(rule, *files)


class HFSource(ImageSource):
    """One split of a Hugging Face `datasets.Dataset` (Arrow, memory-mapped: never held in RAM).

    The image column is the first `Image` feature (or jpg/png/webp/image); the label column a `ClassLabel`
    or one named cls/label/labels. Class names come from the ClassLabel or are given.
    """

    def __init__(self, ds, dataset: str, split: str, class_names: list[str] | None = None,
                 image_col: str | None = None, label_col: str | None = None, source: str = "",
                 index_parts: tuple = ()):
        import datasets as hfd

        feats = ds.features
        cols = list(feats)
        image_col = image_col or next((c for c in cols if isinstance(feats[c], hfd.Image)), None) or \
            next((c for c in ("jpg", "jpeg", "png", "webp", "image", "img") if c in cols), None)
        label_col = label_col or next((c for c in cols if isinstance(feats[c], hfd.ClassLabel)), None) or \
            next((c for c in ("cls", "label", "labels", "fine_label") if c in cols), None)
        if image_col is None or label_col is None:
            raise AlfError(f"dataset '{dataset}' split '{split}': cannot tell the image and label columns "
                           f"apart among {cols}")
        if class_names is None:
            f = feats[label_col]
            class_names = list(f.names) if isinstance(f, hfd.ClassLabel) else None
        labels = np.asarray(ds[label_col], dtype=np.int64)
        if class_names is None:
            class_names = [str(c) for c in range(int(labels.max()) + 1)] if len(labels) else []
        if len(labels) == 0:
            raise AlfError(f"dataset '{dataset}' split '{split}' holds no images")
        if labels.min() < 0 or labels.max() >= len(class_names):
            raise AlfError(f"dataset '{dataset}' split '{split}' has labels outside its {len(class_names)} classes")
        self.dataset, self.split, self.class_names, self.labels = dataset, split, list(class_names), labels
        self.source = source or dataset
        self._index = _sha(self.source, *index_parts, *self.class_names)
        self._ids = list(ds["__key__"]) if "__key__" in cols else None
        self._ds = ds.select_columns([image_col])
        self._image_col = image_col

    def sample_id(self, i: int) -> str:
        return self._ids[i] if self._ids is not None else f"{self.split}/{i}"

    def index_fingerprint(self) -> str:
        return self._index

    def _load(self, i: int) -> Image.Image:
        img = self._ds[int(i)][self._image_col]
        return img if isinstance(img, Image.Image) else Image.open(img)


@dataclass(frozen=True)
class HubDataset:
    """One of the paper's datasets as a CLIP-benchmark web-dataset copy on the Hugging Face hub."""

    name: str
    repo: str
    group: str
    sizes: dict  # approximate train/test image counts, for time and disk estimates only
    num_classes: int = 0


ENV_DATASETS_DIR = "ALF_DATASETS_DIR"  # a local mirror: <dir>/<repo name>/{train,test}/*.tar + classnames.txt

# train sizes: the authors' scripts/configs/webdataset_configs/dataset_info.json (the CLIP-benchmark train
# splits); test sizes are approximate (their repository has none) and used for time and disk estimates only
_PAPER = [
    ("stl10", "wds_stl10", "natural multi-domain", 5000, 8000, 10),
    ("cifar10", "wds_vtab-cifar10", "natural multi-domain", 45000, 10000, 10),
    ("caltech101", "wds_vtab-caltech101", "natural multi-domain", 2753, 6085, 102),
    ("voc2007", "wds_voc2007", "natural multi-domain", 7844, 14976, 20),
    ("cifar100", "wds_vtab-cifar100", "natural multi-domain", 45000, 10000, 100),
    ("country211", "wds_country211", "natural multi-domain", 31650, 21100, 211),
    ("pets", "wds_vtab-pets", "natural single-domain", 2944, 3669, 37),
    ("flowers", "wds_vtab-flowers", "natural single-domain", 1020, 6149, 102),
    ("cars", "wds_cars", "natural single-domain", 8144, 8041, 196),
    ("fgvc-aircraft", "wds_fgvc_aircraft", "natural single-domain", 3334, 3333, 100),
    ("gtsrb", "wds_gtsrb", "natural single-domain", 26640, 12630, 43),
    ("svhn", "wds_vtab-svhn", "natural single-domain", 65931, 26032, 10),
    ("pcam", "wds_vtab-pcam", "specialised", 262144, 32768, 2),
    ("eurosat", "wds_vtab-eurosat", "specialised", 16200, 5400, 10),
    ("resisc45", "wds_vtab-resisc45", "specialised", 18900, 6300, 45),
    ("diabetic-retinopathy", "wds_vtab-diabetic_retinopathy", "specialised", 35126, 42670, 5),
    ("dtd", "wds_vtab-dtd", "structured", 1880, 1880, 47),
    ("fer2013", "wds_fer2013", "structured", 28709, 7178, 7),
    ("dmlab", "wds_vtab-dmlab", "structured", 65550, 22735, 6),
]
HUB_DATASETS: dict[str, HubDataset] = {
    n: HubDataset(n, f"clip-benchmark/{r}", g, {"train": a, "test": b}, c) for n, r, g, a, b, c in _PAPER
}
HUB_DATASETS["imagenet1k"] = HubDataset("imagenet1k", "clip-benchmark/wds_imagenet1k", "extra",
                                        {"train": 1281167, "test": 50000}, 1000)
PAPER_DATASETS = [n for n, *_ in _PAPER]


def _reason(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def wds_folder(entry: HubDataset, split: str) -> Path:
    """The folder holding `<split>/*.tar` and `classnames.txt`: a local mirror, else a hub snapshot (the
    Hugging Face cache; downloaded only when the hub is reachable)."""
    from .weights import hub_reachable, ways_out

    mirror = os.environ.get(ENV_DATASETS_DIR)
    if mirror and (Path(mirror) / entry.repo.split("/")[-1]).is_dir():
        return Path(mirror) / entry.repo.split("/")[-1]
    online = hub_reachable()
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(entry.repo, repo_type="dataset", local_files_only=not online,
                                        allow_patterns=[f"{split}/*", "classnames.txt"]))
    except Exception as e:
        why = ("not in the Hugging Face cache and the hub is unreachable" if not online else _reason(e))
        raise AlfError(f"dataset '{entry.name}': cannot get {entry.repo} ({why}); "
                       f"{ways_out('dataset', entry.name)}") from None
    if not (folder / split).is_dir():
        raise AlfError(f"dataset '{entry.name}': the cached {entry.repo} has no '{split}' shards; "
                       f"{ways_out('dataset', entry.name)}")
    return folder


def _offline_if_unreachable() -> None:
    """HF `datasets` reads its offline switch at import: set it first when the hub cannot be reached, so nothing
    waits on network retries."""
    from .weights import hub_reachable

    if not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"


def _wds_source(folder: Path, repo: str) -> str:
    """`hub:<repo>@<revision>` for a Hugging Face cache snapshot, `mirror:<folder>` for a local mirror."""
    folder = folder.resolve()
    if folder.parent.name == "snapshots":
        return f"hub:{repo}@{folder.name}"
    return f"mirror:{folder}"


def open_webdataset(folder: Path, dataset: str, split: str, source: str = "") -> HFSource:
    """Web-dataset tar shards (`<folder>/<split>/*.tar`, `<key>.{jpg,png,webp}` + `<key>.cls`) via HF datasets."""
    _offline_if_unreachable()
    import datasets as hfd

    shards = sorted((folder / split).glob("*.tar"))
    if not shards:
        have = sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("*.tar")))
        raise unknown_name("split", split, have, hint=f"dataset '{dataset}'")
    names_file = folder / "classnames.txt"
    class_names = [l.strip() for l in names_file.read_text().splitlines() if l.strip()] if names_file.is_file() else None
    try:
        ds = hfd.load_dataset("webdataset", data_files={split: [str(s) for s in shards]}, split=split)
    except Exception as e:
        raise AlfError(f"cannot read the web-dataset shards of '{dataset}' split '{split}': {_reason(e)}") from None
    return HFSource(ds, dataset, split, class_names, source=source or f"mirror:{folder.resolve()}")


def open_hub_dataset(name: str, split: str) -> HFSource:
    from .locks import dataset_lock

    entry = HUB_DATASETS[name]
    with dataset_lock(entry.repo):  # one task downloads and prepares it; the others then read the cache
        folder = wds_folder(entry, split)
        return open_webdataset(folder, name, split, source=_wds_source(folder, entry.repo))


def open_hf(arg: str, split: str) -> HFSource:
    """`hf:<dataset id>` or `hf:<folder written by Dataset(Dict).save_to_disk>`."""
    _offline_if_unreachable()
    import datasets as hfd

    name = f"hf:{arg}"
    local = Path(arg).is_dir()
    try:
        if local:
            obj = hfd.load_from_disk(arg)
            if isinstance(obj, hfd.DatasetDict):
                if split not in obj:
                    raise unknown_name("split", split, list(obj), hint=f"dataset '{name}'")
                obj = obj[split]
            ds = obj
        else:
            from .locks import dataset_lock

            with dataset_lock(arg):  # one task downloads and prepares it; the others then read the cache
                ds = hfd.load_dataset(arg, split=split)
    except AlfError:
        raise
    except Exception as e:
        from .weights import hub_reachable, ways_out

        hint = "" if local or hub_reachable() else f" (not in the Hugging Face cache; {ways_out('dataset', name)})"
        raise AlfError(f"could not load dataset '{name}' split '{split}': {_reason(e)}{hint}") from None
    source = f"hf:{Path(arg).resolve()}" if local else name
    return HFSource(ds, name, split, source=source, index_parts=(repr(ds.features),))


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    factory: Callable[[str], ImageSource]
    description: str


DATASETS: dict[str, DatasetEntry] = {
    "digits": DatasetEntry("digits", DigitsSource,
                           "scikit-learn handwritten digits, 1797 real 8x8 images, 10 classes (offline)"),
}

for _e in HUB_DATASETS.values():
    DATASETS[_e.name] = DatasetEntry(_e.name, lambda split, n=_e.name: open_hub_dataset(n, split),
                                     f"{_e.group}; {_e.repo}; {_e.num_classes} classes; "
                                     f"~{_e.sizes['train']} train / {_e.sizes['test']} test")

PREFIXES: dict[str, Callable[[str, str], ImageSource]] = {
    "imagefolder:": lambda arg, split: ImageFolderSource(arg, split),
    "hf:": open_hf,
}


def dataset_size(name: str) -> dict:
    """Image counts per split: known for the registry, counted for local folders."""
    if name in HUB_DATASETS:
        return dict(HUB_DATASETS[name].sizes)
    return {s: len(open_source(name, s)) for s in ("train", "test")}


def check_dataset(name: str, online: bool):
    """Can this dataset be reached? (for `alf reproduce`'s up-front plan)"""
    from .plan import PlanItem
    from .weights import cached_repo

    if name in HUB_DATASETS:
        e = HUB_DATASETS[name]
        mirror = os.environ.get(ENV_DATASETS_DIR)
        if mirror and (Path(mirror) / e.repo.split("/")[-1]).is_dir():
            return PlanItem("dataset", name, True, f"local mirror in {mirror}")
        if cached_repo(e.repo, "dataset") is not None:
            return PlanItem("dataset", name, True, f"in the local hub cache ({e.repo})")
        return PlanItem("dataset", name, online, f"will download {e.repo}" if online else
                        f"{e.repo} not cached and the hub is unreachable")
    try:
        open_source(name, "test")
        return PlanItem("dataset", name, True, "available")
    except AlfError as err:
        return PlanItem("dataset", name, False, str(err))


def dataset_slug(name: str) -> str:
    """A safe folder name for a dataset name (no path traversal)."""
    for prefix in PREFIXES:
        if name.startswith(prefix):
            arg = Path(name[len(prefix):]).resolve()
            digest = hashlib.sha1(str(arg).encode()).hexdigest()[:8]
            return f"{prefix[:-1]}-{safe_component(arg.name)}-{digest}"
    return safe_component(name)


def check_dataset_name(name: str) -> None:
    """A cheap check of a dataset argument (nothing is opened): a short name or a prefix with a value."""
    for prefix in PREFIXES:
        if name.startswith(prefix):
            if not name[len(prefix):].strip():
                raise AlfError(f"empty dataset after '{prefix}'")
            return
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS, hint="or imagefolder:<path>, hf:<dataset id or folder>")


def open_source(name: str, split: str) -> ImageSource:
    """Open one split of a dataset by name; unknown names fail in one line with suggestions."""
    for prefix, factory in PREFIXES.items():
        if name.startswith(prefix):
            return factory(name[len(prefix):], split)
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS, hint="or imagefolder:<path>, hf:<dataset id or folder>")
    return DATASETS[name].factory(split)
