"""Finding files on the Hugging Face hub before anything is built: the standard Hugging Face cache (HF_HOME /
HF_HUB_CACHE), a download when the hub is reachable, or - fast - one line that names what is missing and the
ways out.

Whether the hub is reachable is decided once per process with a short connection attempt (or HF_HUB_OFFLINE=1);
when it is not, only the cache is consulted, so nothing waits on retries.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
from pathlib import Path

from .errors import AlfError

log = logging.getLogger(__name__)
HUB_HOST = ("huggingface.co", 443)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no", "off")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Can the hub be reached right now? False at once under HF_HUB_OFFLINE=1."""
    if hub_offline():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "")
    host = HUB_HOST
    if endpoint.startswith(("http://", "https://")):
        rest = endpoint.split("://", 1)[1].split("/", 1)[0]
        name, _, port = rest.partition(":")
        host = (name, int(port) if port else (443 if endpoint.startswith("https") else 80))
    try:
        socket.create_connection(host, timeout=timeout).close()
        return True
    except OSError:
        return False


def ways_out(kind: str = "model", name: str = "NAME") -> str:
    """What a user without the files can do, in one clause."""
    if kind == "dataset":
        return (f"run `alf fetch --dataset {name}` where there is internet (a login node), then run offline with "
                f"HF_HUB_OFFLINE=1; or set ALF_DATASETS_DIR to a local mirror")
    return (f"run `alf fetch --model {name}` where there is internet (a login node), then run offline with "
            f"HF_HUB_OFFLINE=1; or pass local-dir:<folder> with the weights")


def hub_file(repo: str, filenames: tuple[str, ...] = WEIGHT_FILES, *, repo_type: str = "model",
             what: str = "", name: str = "NAME", download: bool | None = None) -> Path:
    """The local path of the first of `filenames` that repo `repo` holds, from the cache or downloaded.

    `download`: None = download when the hub is reachable; False = the cache only. Raises AlfError in one line
    (naming `what`, the repo, and the ways out) when no file can be had."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    online = hub_reachable() if download is None else (download and hub_reachable())
    missing = []
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename, repo_type=repo_type, local_files_only=not online))
        except EntryNotFoundError:
            continue  # the repo has no such file: try the next name
        except LocalEntryNotFoundError:
            missing.append(filename)
            continue
        except RepositoryNotFoundError:
            raise AlfError(f"{what or repo}: the Hugging Face hub has no repository '{repo}'") from None
        except Exception as e:  # network trouble halfway: say so, do not retry forever
            reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise AlfError(f"{what or repo}: could not fetch {repo} from the Hugging Face hub ({reason}); "
                           f"{ways_out('dataset' if repo_type == 'dataset' else 'model', name)}") from None
    why = ("the hub is unreachable and they are not in the Hugging Face cache" if not online else
           "the hub repository has none of " + ", ".join(filenames))
    if hub_offline():
        why = "HF_HUB_OFFLINE=1 and they are not in the Hugging Face cache"
    raise AlfError(f"{what or repo}: cannot get the weights from {repo} ({why}); "
                   f"{ways_out('dataset' if repo_type == 'dataset' else 'model', name)}")


def cached_repo(repo: str, repo_type: str = "model") -> Path | None:
    """The newest cached snapshot folder of a hub repo, or None (nothing is downloaded)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, repo_type=repo_type, local_files_only=True))
    except Exception:
        return None


def read_state_dict(path: Path) -> dict:
    """A checkpoint file as a CPU state dict (safetensors, or a torch pickle loaded with weights_only)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd
