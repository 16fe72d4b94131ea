"""Installation tests in environments of their own (`make test-envs`; each part alone: `make test-floor`,
`make test-keep-torch`, `make test-wheel`). They need the project's venv (`make install`: its uv) and the network
to PyPI, or caches that hold what they install; each environment is made anew under ENVS (default .envs/).

floor       the lowest versions [project].dependencies admit (scripts/floor_constraints.py: every `>=` floor as
            `==`; what they pull in resolves as for a user), checked installed, then the fast tests on them.
keep-torch  the user's own torch first (another supported release than uv.lock's, PyPI's CUDA build), then
            alfcache's wheel with plain pip (no project config, no cap): torch is the same afterwards, and the demo
            runs.
wheel       the wheel built from this tree, installed in a fresh environment (versions from uv.lock): the demo and
            a mini reproduction run from an empty folder outside the tree; the wheel carries every data file of
            its packages; the only top-level module it installs beside its packages is `cli`.

Prints each step's time and a closing `N passed, N failed` line; exit status 1 when any part failed."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from floor_constraints import floors  # noqa: E402

# keep-torch: the "cluster's" torch. A supported release other than uv.lock's (2.14.1), with its own torchvision.
USER_TORCH = ("torch==2.13.0", "torchvision==0.28.0")
# the fast part of the suite on the floor: everything but the wall-clock tests and these slow files, which run
# many `alf` processes each (end-to-end runs, kill/resume, torchrun, one error message per run); `make test` runs
# them on the locked versions
FLOOR_SKIP = ("tests/test_analysis.py", "tests/test_distributed.py", "tests/test_faults.py", "tests/test_resume.py",
              "tests/test_multi_model.py", "tests/test_errors.py", "tests/test_store_damage.py",
              "tests/test_slurm.py")  # the scheduler tests: minutes each, the same on every version set
# the only top-level plain module the wheel may install beside its packages (the design's `alf` entry point)
ALLOWED_TOP_MODULES = {"cli"}
WHEEL_PACKAGES = {"alfcache", "probes", "alfstudy"}

TIMES: list[tuple[str, float]] = []


def log(msg: str) -> None:
    print(f"[test-envs] {msg}", flush=True)


def run(cmd, *, step: str, cwd=None, env=None, capture=False, timeout=1800) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    log(f"{step}: {' '.join(cmd)}" + (f"  (in {cwd})" if cwd else ""))
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=cwd, env=env, text=True, timeout=timeout,
                       stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None)
    dt = time.monotonic() - t0
    TIMES.append((step, dt))
    log(f"{step}: {dt:.1f} s, exit {p.returncode}")
    if p.returncode != 0:
        if capture:
            print(p.stdout[-6000:])
        raise RuntimeError(f"{step} failed (exit {p.returncode})")
    return p


def uv(args) -> list[str]:
    exe = Path(os.environ.get("UV", ROOT / ".venv" / "bin" / "uv"))
    if not exe.exists():
        sys.exit(f"{exe} not found: run `make install` first (it installs uv into the project's venv)")
    return [str(exe), *args]


def uv_env() -> dict:
    return dict(os.environ, UV_PYTHON_DOWNLOADS="never", VIRTUAL_ENV="")


def plain_pip_env() -> dict:
    """pip as a user elsewhere has it: no config files (so no cap on torch, no local wheel folders), PyPI only."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    e.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    if "PIP_CERT" in os.environ:  # the machine's CA bundle (a setting of the network, not of pip's choices)
        e["PIP_CERT"] = os.environ["PIP_CERT"]
    return e


def new_env(path: Path, *, with_pip: bool = False) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    if with_pip:
        run([sys.executable, "-m", "venv", path], step=f"{path.name}: venv")
    else:
        run(uv(["venv", "--quiet", "--python", sys.executable, path]), step=f"{path.name}: venv", env=uv_env())
    return path / "bin" / "python"


def versions(py: Path, names) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys; "
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))")
    out = subprocess.run([str(py), "-c", code, *names], capture_output=True, text=True, check=True).stdout
    import json
    return json.loads(out)


def torch_identity(py: Path) -> str:
    code = "import torch, os; print(torch.__version__, os.path.getmtime(torch.__file__))"
    return subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def build_wheel(envs: Path) -> Path:
    dist = envs / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    run(uv(["build", "--wheel", "--out-dir", dist, ROOT]), step="wheel: build", env=uv_env())
    wheels = sorted(dist.glob("alfcache-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def demo(bindir: Path, *, mini: bool) -> None:
    """`make demo` (and `make reproduce-mini`) as `alf` commands, from an empty folder outside the source tree."""
    work = Path(tempfile.mkdtemp(prefix="alf-demo-"))
    assert ROOT not in work.parents
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PYTHONSAFEPATH="1")
    alf = str(bindir / "alf")
    try:
        steps = [
            [alf, "build-random-model", "demo/model"],
            [alf, "extract", "--model", "local-dir:demo/model", "--dataset", "digits", "--out", "demo/features",
             "--workers", "0"],
            [alf, "ls", "demo/features"],
            [alf, "probe", "--store-root", "demo/features", "--grid", "quick", "--head",
             "linear,linear-clsap,concat,alf", "--out", "demo/results"],
        ]
        if mini:
            steps += [
                [alf, "build-random-model", "mini/models/tiny-a", "--embed-dim", "48", "--depth", "4",
                 "--num-heads", "3", "--seed", "0"],
                [alf, "reproduce", "--root", "mini", "--grid", "quick", "--workers", "0", "--models",
                 "local-dir:mini/models/tiny-a", "--datasets", "digits", "--heads", "linear,alf"],
            ]
        for cmd in steps:
            run(cmd, step=f"demo: alf {cmd[1]}", cwd=work, env=env, capture=True)
        # where the code came from: the environment, never the source tree
        code = ("import sysconfig, alfcache, probes, cli; site = sysconfig.get_paths()['purelib']; "
                "print([m.__file__ for m in (alfcache, probes, cli) if not m.__file__.startswith(site + '/')])")
        where = subprocess.run([str(bindir / "python"), "-c", code], cwd=work, env=env, capture_output=True,
                               text=True, check=True).stdout.strip()
        assert where == "[]", f"imported from outside the environment's site-packages: {where}"
        results = list((work / "demo" / "results").rglob("*"))
        assert any(p.is_file() for p in results), "the demo wrote no results"
        if mini:
            tables = list((work / "mini").rglob("means_vs_paper.csv"))
            assert tables and tables[0].read_text().count("\n") > 1, "reproduce wrote no comparison with the paper"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_wheel_contents(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    modules = {t[:-3] for t in top if t.endswith(".py")}
    packages = {t for t in top if not t.endswith(".py")}
    # every data file (not .py) tracked under the wheel's packages is in the wheel
    tracked = subprocess.run(["git", "ls-files", *sorted(packages)], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    data = [f for f in tracked if not f.endswith(".py")]
    missing = [f for f in data if f not in names]
    assert not missing, f"package data missing from the wheel: {missing}"
    log(f"wheel: packages {sorted(packages)}, data files {data}, top-level modules {sorted(modules)}")
    assert packages == WHEEL_PACKAGES, f"packages in the wheel: {sorted(packages)}"
    assert modules == ALLOWED_TOP_MODULES, (f"top-level modules besides the packages: {sorted(modules)}; "
                                            f"allowed: {sorted(ALLOWED_TOP_MODULES)}")


def part_floor(envs: Path, pytest_args: list[str]) -> None:
    py = new_env(envs / "floor")
    cons = envs / "floor-constraints.txt"
    cons.write_text("\n".join(floors()) + "\n")
    run(uv(["pip", "install", "--python", py, "-c", cons, "-e", f"{ROOT}[test]"]), step="floor: install",
        env=uv_env())
    want = dict(line.split("==") for line in floors())
    have = versions(py, want)
    from packaging.version import Version  # in the project's venv (a dependency of its dependencies)
    wrong = {n: (have[n], v) for n, v in want.items() if Version(Version(have[n]).public) != Version(v)}
    assert not wrong, f"not the floor (installed, floor): {wrong}"
    log("floor: " + ", ".join(f"{n} {have[n]}" for n in want))
    run(uv(["pip", "freeze", "--python", py]), step="floor: resolved set")
    deselect = [a for f in FLOOR_SKIP for a in ("--ignore", f)]
    run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "-m", "not serial", *deselect,
         *pytest_args], step="floor: fast tests", cwd=ROOT)


def part_keep_torch(envs: Path, wheel: Path | None) -> None:
    py = new_env(envs / "keep-torch", with_pip=True)
    # the user's torch, installed before alfcache (uv: PyPI's build, whatever local wheel folders pip is pointed at)
    run(uv(["pip", "install", "--python", py, *USER_TORCH]), step="keep-torch: the user's torch", env=uv_env())
    before = torch_identity(py)
    wheel = wheel or build_wheel(envs)
    p = run([py, "-m", "pip", "install", wheel], step="keep-torch: pip install alfcache", env=plain_pip_env(),
            capture=True)
    print("\n".join(line for line in p.stdout.splitlines() if "Successfully" in line or "torch" in line.lower()))
    after = torch_identity(py)
    assert before == after, f"torch changed: {before} -> {after}"
    assert not re.search(r"Uninstalling torch", p.stdout), "pip uninstalled torch"
    log(f"keep-torch: torch {after.split()[0]} kept")
    demo(py.parent, mini=False)


def part_wheel(envs: Path, wheel: Path | None) -> None:
    wheel = wheel or build_wheel(envs)
    py = new_env(envs / "wheel")
    cons = envs / "lock-constraints.txt"
    run(uv(["export", "--frozen", "--no-hashes", "--no-emit-project", "--all-extras", "--format",
            "requirements-txt", "--output-file", cons, "--project", ROOT]), step="wheel: lock as constraints",
        env=uv_env(), capture=True)
    run(uv(["pip", "install", "--python", py, "-c", cons, wheel]), step="wheel: install", env=uv_env())
    demo(py.parent, mini=True)
    check_wheel_contents(wheel)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="*", default=["floor", "keep-torch", "wheel"],
                    choices=["floor", "keep-torch", "wheel"])
    ap.add_argument("--envs", type=Path, default=ROOT / ".envs")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments for the floor tests")
    a = ap.parse_args()
    a.envs = a.envs.resolve()
    a.envs.mkdir(parents=True, exist_ok=True)
    wheel = None
    passed, failed = [], []
    t_all = time.monotonic()
    for part in a.parts:
        t0 = time.monotonic()
        try:
            if part == "floor":
                part_floor(a.envs, a.pytest_args.split())
            else:
                if wheel is None:
                    wheel = build_wheel(a.envs)
                (part_keep_torch if part == "keep-torch" else part_wheel)(a.envs, wheel)
            passed.append(part)
            log(f"PASSED {part} ({time.monotonic() - t0:.0f} s)")
        except Exception as e:  # noqa: BLE001 - report every part
            failed.append(part)
            log(f"FAILED {part} ({time.monotonic() - t0:.0f} s): {e}")
    log("step times: " + "; ".join(f"{s} {t:.0f}s" for s, t in TIMES))
    log(f"total {time.monotonic() - t_all:.0f} s; passed: {passed or '-'}; failed: {failed or '-'}")
    print(f"{len(passed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
