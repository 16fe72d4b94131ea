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


def loader_for(source: ImageSource, transform, input_size, chunks: list[int], rows: int, batch_size: int,
               workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ImageDataset(source, transform, input_size),
                                       batch_sampler=ChunkBatches(chunks, rows, len(source), batch_size),
                                       num_workers=workers, pin_memory=pin_memory, persistent_workers=False)


def first_readable(source: ImageSource, transform, input_size, device: torch.device, k: int = 16) -> torch.Tensor:
    """The first k readable images of a split (for the autocast agreement check)."""
    ds = ImageDataset(source, transform, input_size)
    xs = [x for x, _, _, err in (ds[i] for i in range(min(len(ds), 4 * k))) if not err][:k]
    if not xs:
        raise AlfError(f"no readable image among the first {min(len(ds), 4 * k)} of split '{source.split}'")
    return torch.stack(xs).to(device)
