"""The progress manifest of a store being written: which chunks are durable (with their checksums) and which
images were skipped.

Each writer (a rank of a distributed run, or the one process) keeps its own file, replaced atomically after every
chunk; the chunk data is on disk before its manifest entry, so an entry never names data that is not there. A
manifest that cannot be read (truncated by a crash or by hand) is ignored with a warning: its chunks are simply
extracted again, which is always safe.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .format import write_atomic

log = logging.getLogger(__name__)
PREFIX = "alf_progress"


@dataclass
class Progress:
    done: dict[int, str] = field(default_factory=dict)  # chunk index -> checksum
    skipped: list[str] = field(default_factory=list)  # sample ids of unreadable images that were skipped


class Manifest:
    """The manifest files of one store folder; this writer's own file is `file`."""

    def __init__(self, folder: Path, rank: int = 0, world: int = 1):
        self.folder, self.rank, self.world = folder, rank, world
        self.file = folder / (f"{PREFIX}.json" if world == 1 else f"{PREFIX}.rank{rank}.json")
        self.mine = Progress()  # what this writer recorded (= the merged view for a single writer)

    def files(self) -> list[Path]:
        return sorted(self.folder.glob(f"{PREFIX}*.json"))

    def exists(self) -> bool:
        return bool(self.files())

    def load(self) -> Progress:
        """Every writer's manifest merged: a chunk is done if any writer recorded it."""
        merged, mine = Progress(), Progress()
        for f in self.files():
            try:
                raw = json.loads(f.read_text())
                part = Progress({int(k): str(v) for k, v in raw["done"].items()}, [str(s) for s in raw["skipped"]])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                log.warning("progress manifest %s is damaged; the chunks it recorded will be extracted again", f)
                continue
            merged.done.update(part.done)
            merged.skipped += part.skipped
            if f == self.file:
                mine = part
        merged.skipped = sorted(set(merged.skipped))
        self.mine = mine if self.world > 1 else Progress(dict(merged.done), list(merged.skipped))
        return merged

    def record(self, k: int, checksum: str, skipped: list[str]) -> None:
        self.mine.done[k] = checksum
        self.mine.skipped += skipped
        self.save()

    def save(self) -> None:
        write_atomic(self.file, json.dumps({"done": {str(k): v for k, v in sorted(self.mine.done.items())},
                                            "skipped": self.mine.skipped}))

    def remove(self) -> None:
        for f in self.files():
            f.unlink(missing_ok=True)
