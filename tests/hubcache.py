"""Build a Hugging Face cache the way a login node leaves it after downloading (`refs/main` -> a snapshot folder
whose files link to content-addressed blobs), so the real hub-id code paths run offline."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _put(cache: Path, kind: str, repo: str, files: dict[str, bytes]) -> Path:
    folder = cache / f"{kind}s--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / COMMIT
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    for rel, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        blob = folder / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        target = snap / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        os.symlink(os.path.relpath(blob, target.parent), target)
    return snap


def cache_model(cache: Path, repo: str, state_dict: dict) -> Path:
    """Weights of `repo` (e.g. timm/vit_small_patch16_224.augreg_in21k_ft_in1k) as model.safetensors."""
    from safetensors.torch import save

    return _put(cache, "model", repo, {"model.safetensors": save({k: v.contiguous() for k, v in state_dict.items()})})


def wds_shard(samples: list[tuple[str, bytes, str, int]]) -> bytes:
    """A web-dataset tar shard: for each sample `<key>.<ext>` (image bytes) and `<key>.cls` (label)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, data, ext, label in samples:
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def cache_wds_dataset(cache: Path, repo: str, splits: dict[str, list[tuple[str, bytes, str, int]]],
                      classnames: list[str]) -> Path:
    """A CLIP-benchmark web dataset (`<split>/0.tar` + `classnames.txt`) in the cache."""
    files = {f"{split}/0.tar": wds_shard(samples) for split, samples in splits.items()}
    files["classnames.txt"] = ("\n".join(classnames) + "\n").encode()
    return _put(cache, "dataset", repo, files)
