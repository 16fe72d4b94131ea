"""Feeding images to the model: a Dataset that turns unreadable images into error strings (so one line can name
the file), and a sampler whose batches never straddle a store chunk, for the chunks a process still has to do."""
from __future__ import annotations

import torch

from .datasets import ImageSource
from .errors import AlfError


class ImageDataset(torch.utils.data.Dataset):
    """Returns (image tensor, label, index, error). A bad image yields an error string, not an exception, so the
    main process can report it in one line (exceptions from DataLoader workers arrive wrapped)."""

    def __init__(self, source: ImageSource, transform, input_size):
        self.source, self.transform, self.input_size = source, transform, tuple(input_size)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        try:
            x = self.transform(self.source.load(i))
            err = ""
        except AlfError as e:
            x, err = torch.zeros(self.input_size), str(e)
        return x, int(self.source.labels[i]), i, err


class ChunkBatches(torch.utils.data.Sampler):
    """Batches of indices, never crossing a chunk boundary, for the given chunks only."""

    def __init__(self, chunks: list[int], rows: int, n: int, batch_size: int):
        self.batches = [list(range(s, min(s + batch_size, min(n, (k + 1) * rows))))
                        for k in chunks for s in range(k * rows, min(n, (k + 1) * rows), batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def first_readable(source: ImageSource, transform, input_size, device: torch.device, k: int = 16) -> torch.Tensor:
    """The first k readable images of a split (for the autocast agreement check)."""
    ds = ImageDataset(source, transform, input_size)
    xs = [x for x, _, _, err in (ds[i] for i in range(min(len(ds), 4 * k))) if not err][:k]
    if not xs:
        raise AlfError(f"no readable image among the first {min(len(ds), 4 * k)} of split '{source.split}'")
    return torch.stack(xs).to(device)


# ------------------------------------------------------------------------------------------ one decode, many models
def transform_key(transform) -> str:
    """Identity of a preprocessing pipeline: its type and repr (torchvision/timm transforms print every
    parameter: sizes, interpolation, crop, mean, std). Models with equal keys share one preprocessed tensor."""
    return f"{type(transform).__module__}.{type(transform).__qualname__}:{transform!r}"


class SharedImageDataset(torch.utils.data.Dataset):
    """Decodes image i once and applies each distinct preprocessing that a model needing row i uses, once
    (`need`: (N, M) bools; models with the same pipeline, as ViT-S/B/L, get the same tensor). Returns (tuple of M
    tensors or None, label, index, error)."""

    def __init__(self, source: ImageSource, transforms: list, input_sizes: list, need):
        self.source, self.transforms, self.input_sizes, self.need = source, transforms, [tuple(s) for s in input_sizes], need
        keys = [transform_key(t) for t in transforms]
        self.first = [keys.index(k) for k in keys]  # the model whose pipeline's result each model reuses

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        wanted = self.need[i]
        try:
            img = self.source.load(i)
            done: dict[int, torch.Tensor] = {}
            for m, w in enumerate(wanted):
                if w and self.first[m] not in done:
                    done[self.first[m]] = self.transforms[m](img)
            xs = tuple(done[self.first[m]] if w else None for m, w in enumerate(wanted))
            err = ""
        except AlfError as e:
            xs, err = tuple(torch.zeros(s) if w else None for s, w in zip(self.input_sizes, wanted)), str(e)
        return xs, int(self.source.labels[i]), i, err


def _collate_shared(items):
    xs = tuple(torch.stack([it[0][j] for it in items]) if items[0][0][j] is not None else None
               for j in range(len(items[0][0])))
    return (xs, torch.tensor([it[1] for it in items]), torch.tensor([it[2] for it in items]),
            [it[3] for it in items])


def segments(plans: list[list[list[int]]], n: int):
    """The pieces every model's batches are made of: the rows between consecutive batch boundaries of any model,
    each needed by the same models throughout. Returns (segments as index lists, (N, M) bool `need`)."""
    import numpy as np

    need = np.zeros((n, len(plans)), dtype=bool)
    cuts = set()
    for m, batches in enumerate(plans):
        for b in batches:
            need[b[0]:b[-1] + 1, m] = True
            cuts.update((b[0], b[-1] + 1))
    cuts = sorted(cuts)
    return [list(range(a, b)) for a, b in zip(cuts, cuts[1:]) if need[a].any()], need


def shared_loader(source: ImageSource, transforms: list, input_sizes: list, plans: list[list[list[int]]],
                  workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """Images decoded once for several models: yields segments (see `segments`) with one tensor per model that
    needs them; each model then assembles exactly the batches its own single-model run would form."""
    segs, need = segments(plans, len(source))
    return torch.utils.data.DataLoader(SharedImageDataset(source, transforms, input_sizes, need), batch_sampler=segs,
                                       collate_fn=_collate_shared, num_workers=workers, pin_memory=pin_memory,
                                       persistent_workers=False)
