import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: hub ids must fail fast and clearly
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest process per core: one compute thread each (inherited by the `alf` subprocesses)
    # instead of every process spinning a thread per core on cores the others use
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def pytest_configure(config):
    """Under `make mutate`, mutmut first runs the tests with MUTANT_UNDER_TEST=stats to record which tests reach
    which function. Only this process can record that: a child process (the `alf` CLI) would look for mutmut's
    configuration in its own working directory and fail. Keep the setting in this process only (mutmut holds a
    process-local copy); children run the unmutated code, as they do in a normal run. Mutant runs are untouched:
    there children inherit the mutant, so CLI tests kill mutants too."""
    if os.environ.get("MUTANT_UNDER_TEST") == "stats":
        os.environ.pop("MUTANT_UNDER_TEST")


def run_alf(*args, env=None, check=False, timeout=300, cwd=None):
    """Run the real `alf` CLI in a subprocess; returns CompletedProcess (text)."""
    e = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    e.update(env or {})
    p = subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                       env=e, timeout=timeout, cwd=cwd or ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"alf {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@contextlib.contextmanager
def fixture_dir(tmp_path_factory, name: str):
    """The folder of a fixture's files, and whether they must still be built: `with fixture_dir(f, "x") as (out,
    todo): if todo: <write into out>`. Fresh for each session (tmp_path_factory), unless ALF_TEST_FIXTURE_CACHE
    names a folder: then kept there, built once under a lock, and reused by later pytest runs. `make mutate`
    sets it (tests/mutation_run.py builds the fixtures with the unmutated code first): each mutant's run reuses
    them instead of extracting the same stores again, so a mutant is tested by the tests themselves, not by
    the fixtures' extractions."""
    root = os.environ.get("ALF_TEST_FIXTURE_CACHE")
    if not root:
        yield tmp_path_factory.mktemp(name), True
        return
    import fcntl
    import shutil

    out, done = Path(root) / name, Path(root) / f"{name}.built"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(root) / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            yield out, False
            return
        shutil.rmtree(out, ignore_errors=True)  # an interrupted build
        out.mkdir()
        yield out, True
        done.touch()


def decode_error(store: Path, name: str, rows) -> str:
    """The type name of the error zarr itself raises reading `rows` of a damaged array (what messages must name)."""
    import zarr

    try:
        zarr.open_group(str(store), mode="r")[name][rows]
    except Exception as x:  # noqa: BLE001
        return type(x).__name__
    raise AssertionError(f"'{name}' decoded although damaged")


def add_projection(store: Path, weight: np.ndarray, bias: np.ndarray) -> None:
    """Give a local Zarr store the model's output projection (as CLIP's visual.proj) the way the extractor
    records it: `projection/weight` and `projection/bias` arrays and their checksums in the metadata."""
    import zarr

    from alfcache.format import array_checksum

    g = zarr.open_group(str(store), mode="r+")
    arrays = {"projection/weight": weight, "projection/bias": bias}
    for name, a in arrays.items():
        g.create_array(name, shape=a.shape, dtype=a.dtype)[...] = a  # (`data=` is newer than the floor's zarr)
    g.attrs.put({**g.attrs, "projection": {"checksums": {n: array_checksum(a) for n, a in arrays.items()}}})


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A small timm ViT with random weights, saved in timm's own folder layout (offline stand-in)."""
    from alfcache.backbones import build_random_model

    with fixture_dir(tmp_path_factory, "models") as (out, todo):
        if todo:
            build_random_model(out / "tiny", img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, seed=0)
    return out / "tiny"


@pytest.fixture(scope="session")
def digits_stores(tiny_model, tmp_path_factory):
    """Zarr stores (train, test) of the digits dataset through the tiny model."""
    from alfcache.extract import ExtractConfig, extract

    with fixture_dir(tmp_path_factory, "features") as (out, todo):
        if todo:
            extract(ExtractConfig(model=f"local-dir:{tiny_model}", dataset="digits", out=out, workers=0,
                                  batch_size=64, progress=False))
    return {split: next(out.rglob(f"{split}.zarr")) for split in ("train", "test")}


def write_image_folder(root: Path, classes=("cat", "dog"), per_class=6, size=20, seed=0, splits=("train", "test")):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i:03d}.png")
    return root
