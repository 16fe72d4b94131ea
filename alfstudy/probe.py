"""`alf probe`: every pair of stores under a root, the given heads, one line per result, then the summary."""
from __future__ import annotations

import os
from pathlib import Path

from probes.errors import ProbeError

from .jobs import Echo
from .results import check_output, result_line


def probe_stores(store_root: Path, heads: list[str], out: Path, *, dataset: str | None = None,
                 model: str | None = None, protocol: str = "paper", seed: int = 0, device: str = "auto",
                 allow_incomplete: bool = False, tap: str | None = None, verify: bool = True,
                 distributed: bool = False, seeds: int = 1, echo: Echo = print,
                 cache_dir: Path | None = None) -> Path | None:
    """`alf probe`: every (dataset, model) pair under the store root (or the one named), the given heads, one
    result line per head, then the summary table. Returns summary.md (None on ranks > 0)."""
    from probes import ranks as rank_group
    from probes.results import write_summary
    from probes.runner import check_heads, discover, run_heads

    check_heads(heads)
    if distributed and "WORLD_SIZE" not in os.environ:
        raise ProbeError("--distributed needs a torch.distributed launcher (torchrun sets WORLD_SIZE)")
    ranks, device = rank_group.init(device)
    pairs = discover(store_root, dataset, model)
    if ranks.rank == 0:
        check_output(out)
    if len(pairs) > 1 and (dataset is None or model is None):
        echo(f"probing {len(pairs)} dataset x model pairs: {', '.join(f'{p.dataset} x {p.model}' for p in pairs)}")
    for pair in pairs:
        run_heads(pair, heads, protocol, out, seed=seed, device=device, allow_incomplete=allow_incomplete,
                  on_result=(lambda r: echo(result_line(r))) if ranks.rank == 0 else None, tap=tap, verify=verify,
                  seeds=seeds, cache_dir=cache_dir)
    if ranks.rank > 0:
        return None
    _, md, _ = write_summary(out)
    return md
