"""Shuffled training batches over rows of a FeatureSet, in RAM or streamed from a store larger than RAM.

Every epoch yields ceil(n / B) batches (the last one partial), as a DataLoader without drop_last does, so the
optimiser steps line up with whole epochs.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .selection import TokenSpec


class BatchStream:
    """Endless shuffled batches of (tokens, labels) over `rows` of a FeatureSet.

    In memory: tokens are read once. Otherwise (store larger than the RAM budget) each epoch visits
    chunk-sized blocks in random order and shuffles rows inside windows of blocks, so every block is
    read once per epoch with contiguous reads, the next window decoding in a background thread while the
    current one is consumed (at most two windows of 4 batches in RAM). The order depends on the seed only.
    """

    def __init__(self, fs, rows: np.ndarray, spec: TokenSpec, batch_size: int, seed: int,
                 in_memory: bool | None = None, ram_budget: int = 4 << 30):
        self.fs, self.rows, self.spec, self.B = fs, np.sort(rows), spec, batch_size
        self.rng = np.random.default_rng(seed)
        self.layout = fs.layout(spec)
        need = len(rows) * self.layout.num_tokens * self.layout.width * 4
        self.in_memory = need <= ram_budget if in_memory is None else in_memory
        self.labels = fs.labels
        self._buffers = None  # streaming: two window buffers, reused
        if self.in_memory:
            self.tokens = fs.tokens(self.rows, spec)

    def __iter__(self):
        while True:
            yield from self._epoch()

    def _epoch(self):
        if self.in_memory:
            perm = self.rng.permutation(len(self.rows))
            for s in range(0, len(perm), self.B):
                pos = perm[s:s + self.B]
                yield self.tokens[pos], self.labels[self.rows[pos]]
            return
        blocks = np.split(self.rows, np.flatnonzero(np.diff(self.rows // self.fs.chunk_rows)) + 1)
        order = self.rng.permutation(len(blocks))
        per_window = max(1, math.ceil(4 * self.B / max(1, self.fs.chunk_rows)))
        windows = [np.sort(np.concatenate([blocks[i] for i in order[w:w + per_window]]))
                   for w in range(0, len(order), per_window)]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="alf-prefetch") as pool:
            yield from self._windows(windows, pool)

    def _windows(self, windows: list[np.ndarray], pool: ThreadPoolExecutor):
        """Batches from windows of rows; the next window is read and decoded in the background meanwhile,
        into the other of two buffers kept across epochs (every batch handed out is a copy)."""
        most = max(len(r) for r in windows)
        if self._buffers is None or len(self._buffers[0]) < most:
            shape = (most, self.layout.num_tokens, self.layout.width)
            self._buffers = [np.empty(shape, np.float32) for _ in range(2)]
        read = lambda w: self.fs.tokens(windows[w], self.spec, out=self._buffers[w % 2])
        carry_x, carry_y = None, None  # fewer than B rows left over from the previous window
        ahead = pool.submit(read, 0)
        for w, rows in enumerate(windows):
            x, y = ahead.result(), self.labels[rows]
            if w + 1 < len(windows):  # window w - 1's buffer: all its batches were copied out
                ahead = pool.submit(read, w + 1)
            perm = self.rng.permutation(len(rows))
            s = 0
            if carry_x is not None:  # complete the straddling batch, then gather whole batches from the window
                s = min(self.B - len(carry_x), len(perm))
                carry_x, carry_y = np.concatenate([carry_x, x[perm[:s]]]), np.concatenate([carry_y, y[perm[:s]]])
                if len(carry_x) < self.B:
                    continue
                yield carry_x, carry_y
            full = (len(perm) - s) // self.B
            for i in range(full):
                pos = perm[s + i * self.B:s + (i + 1) * self.B]
                yield x[pos], y[pos]
            s += full * self.B
            carry_x, carry_y = x[perm[s:]], y[perm[s:]]
        if carry_x is not None and len(carry_x):
            yield carry_x, carry_y
