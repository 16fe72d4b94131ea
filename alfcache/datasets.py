"""Image sources for extraction: `digits` (scikit-learn's bundled real data) and `imagefolder:<path>`.

A source is one split of one dataset: it knows its length, class names, how to load
image i as an RGB PIL image, its label and a stable sample id. New datasets (the paper's
20, HF datasets) plug in by registering a factory in `DATASETS` or a prefix in `PREFIXES`.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import AlfError, unknown_name

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class ImageSource:
    """One split of a dataset. Subclasses implement `_load` and fill the fields."""

    dataset: str
    split: str
    class_names: list[str]
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def sample_id(self, i: int) -> str:
        raise NotImplementedError

    def _load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def load(self, i: int) -> Image.Image:
        """Image i as RGB (grayscale, palette, CMYK and RGBA are converted)."""
        try:
            img = self._load(i)
            img.load()
            return img.convert("RGB")
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

    def describe(self) -> dict:
        return {"dataset": self.dataset, "split": self.split, "num_samples": len(self),
                "class_names": list(self.class_names), "fingerprint": self.fingerprint()}


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
        self.dataset, self.split = "digits", split
        self.class_names = [str(c) for c in d.target_names]
        self._rows = rows
        self._images = (d.images[rows] * (255.0 / 16.0)).round().astype(np.uint8)
        self.labels = d.target[rows].astype(np.int64)

    def sample_id(self, i: int) -> str:
        return f"digits/{int(self._rows[i])}"

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
        self.dataset, self.split = f"imagefolder:{root.resolve()}", split
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
        self.class_names = classes
        self._files = files
        self._base = base
        self.labels = np.asarray(labels, dtype=np.int64)

    def sample_id(self, i: int) -> str:
        return str(self._files[i].relative_to(self._base))

    def _load(self, i: int) -> Image.Image:
        return Image.open(self._files[i])


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    factory: Callable[[str], ImageSource]
    description: str


DATASETS: dict[str, DatasetEntry] = {
    "digits": DatasetEntry("digits", DigitsSource,
                           "scikit-learn handwritten digits, 1797 real 8x8 images, 10 classes (offline)"),
}

PREFIXES: dict[str, Callable[[str, str], ImageSource]] = {
    "imagefolder:": lambda arg, split: ImageFolderSource(arg, split),
}


def dataset_slug(name: str) -> str:
    """A safe folder name for a dataset name (no path traversal)."""
    for prefix in PREFIXES:
        if name.startswith(prefix):
            arg = Path(name[len(prefix):]).resolve()
            digest = hashlib.sha1(str(arg).encode()).hexdigest()[:8]
            return f"{prefix[:-1]}-{_safe(arg.name)}-{digest}"
    return _safe(name)


def _safe(s: str) -> str:
    out = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in s).strip(".-") or "unnamed"
    return out


def open_source(name: str, split: str) -> ImageSource:
    """Open one split of a dataset by name; unknown names fail in one line with suggestions."""
    for prefix, factory in PREFIXES.items():
        if name.startswith(prefix):
            return factory(name[len(prefix):], split)
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS, hint="or imagefolder:<path>")
    return DATASETS[name].factory(split)
