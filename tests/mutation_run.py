"""`make mutate`: run mutmut (configured in pyproject.toml, [tool.mutmut]) module by module, time each module, then
print the mutation score and every surviving mutant (docs/MUTATION.md).

    python tests/mutation_run.py [--modules probes.optim,probes.pool] [--jobs 1] [--fresh] [--retest] [--report-only]

A target is a module (probes.optim) or a glob of mutant names (probes.features.x_check_compatible*). Each target
is run with `mutmut run --max-children JOBS '<target>.*'`, which re-tests its mutants even when mutmut has cached
results, so the time printed is the time of testing them. --fresh deletes mutants/ first (mutmut then generates
the mutants and runs the selected tests once to learn which tests reach which function: "stats").

Mutants listed in tests/mutation_equivalent.txt (`name  equivalent|message  reason`) are reported with their
reason instead of as survivors: "equivalent" = same behaviour, "message" = only the wording of an error message
that no promise covers. Score = killed / (tested - equivalent - message); a timeout counts as killed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["probes.optim", "probes.protocol", "probes.pool", "alfcache.format", "probes.features", "probes.runner"]
EQUIVALENT = ROOT / "tests" / "mutation_equivalent.txt"
TIMES = ROOT / "mutants" / "mutation-times.json"
FIXTURES = ROOT / ".mutation-fixtures"
KILLED = {1, 3, 36, -24, 24, 152, 255}  # test failure, pytest internal error, timeouts (mutmut's exit codes)
SURVIVED, NO_TESTS = {0}, {5, 33}


def mutmut_bin() -> str:
    here = Path(sys.executable).with_name("mutmut")
    return str(here) if here.exists() else "mutmut"


def not_killed(pattern: str) -> list[str]:
    """Mutants matching pattern whose last result is not a kill (survived, no tests, not tested yet)."""
    import fnmatch

    out = []
    for meta in (ROOT / "mutants").rglob("*.py.meta"):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if fnmatch.fnmatch(name, pattern) and code not in KILLED:
                out.append(name)
    return sorted(out)


def regenerate() -> None:
    """Bring mutants/ up to date with the sources as `mutmut run` does first (mutants of changed functions become
    untested, those of removed ones go), so that the names to re-test are current."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        from mutmut.__main__ import copy_also_copy_files, copy_src_dir, create_mutants

        copy_src_dir()
        copy_also_copy_files()
        create_mutants(1)
    finally:
        os.chdir(cwd)


def build_fixtures() -> None:
    """Build the tests' stores and models once, with the unmutated code, into FIXTURES (`fixture_dir` in
    tests/conftest.py): mutmut runs the tests once per mutant, and rebuilding them (extractions through a model)
    took most of each run's time. Rebuilt at every start (the code may have changed since)."""
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    shutil.rmtree(FIXTURES, ignore_errors=True)
    os.environ["ALF_TEST_FIXTURE_CACHE"] = str(FIXTURES)  # inherited by mutmut and its test runs
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pytest", "--setup-only", "-q", *cfg["pytest_add_cli_args"],
                        *cfg["pytest_add_cli_args_test_selection"]], cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        sys.exit(f"building the test fixtures failed:\n{p.stdout[-3000:]}")
    print(f"=== fixtures built once in {time.time() - t0:.0f} s ({FIXTURES.relative_to(ROOT)})", flush=True)


def run_targets(targets: list[str], jobs: int, retest: bool = False) -> None:
    times = json.loads(TIMES.read_text()) if TIMES.exists() else {}
    build_fixtures()
    for t in targets:
        pattern = t if "*" in t else f"{t}.*"
        names = [pattern]
        if retest:
            regenerate()
            names = not_killed(pattern)
            if not names:
                continue
        print(f"=== mutmut run {pattern}" + (f" ({len(names)} not killed before)" if retest else ""), flush=True)
        t0 = time.time()
        p = subprocess.run([mutmut_bin(), "run", "--max-children", str(jobs), *names], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.time() - t0
        tail = [ln for ln in p.stdout.replace("\r", "\n").splitlines() if ln.strip()][-3:]
        print("\n".join(tail))
        print(f"=== {t}: {wall:.0f} s (exit {p.returncode})", flush=True)
        if p.returncode != 0:
            sys.exit(f"mutmut failed on {t}:\n{p.stdout[-3000:]}")
        TIMES.parent.mkdir(exist_ok=True)
        if retest:  # the module's time stays the time of its last full run
            times.setdefault("retests", {})[t] = {"seconds": round(wall), "mutants": len(names)}
        else:
            times[t] = {"seconds": round(wall), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "jobs": jobs}
        TIMES.write_text(json.dumps(times, indent=1))


def load_equivalent() -> dict[str, tuple[str, str]]:
    out = {}
    if EQUIVALENT.exists():
        for ln in EQUIVALENT.read_text().splitlines():
            if ln.strip() and not ln.startswith("#"):
                name, kind, reason = ln.split(None, 2)
                assert kind in ("equivalent", "message"), ln
                out[name] = (kind, reason)
    return out


def changed_lines(name: str, path: str) -> str:
    try:
        from mutmut.mutation.diff_apply import get_diff_for_mutant

        diff = get_diff_for_mutant(name, path=path)
    except Exception as e:  # noqa: BLE001 - a report line, not a failure
        return f"(no diff: {type(e).__name__})"
    lines = [ln for ln in diff.splitlines() if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    return " | ".join(ln[0] + " " + ln[1:].strip() for ln in lines)


def report(targets: list[str] | None) -> int:
    os.chdir(ROOT)
    equivalent = load_equivalent()
    codes: dict[str, dict[str, int | None]] = defaultdict(dict)
    paths = {}
    for meta in sorted((ROOT / "mutants").rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        src = str(meta.relative_to(ROOT / "mutants"))[:-len(".meta")]
        for name, code in data["exit_code_by_key"].items():
            mod = name.split(".x")[0] if ".xǁ" in name or ".x_" in name else name.rsplit(".", 1)[0]
            codes[mod][name] = code
            paths[name] = src
    import fnmatch

    def wanted(name: str) -> bool:
        return not targets or any(fnmatch.fnmatch(name, t if "*" in t else f"{t}.*") for t in targets)

    times = json.loads(TIMES.read_text()) if TIMES.exists() else {}
    rows, survivors, listed = [], [], []
    tot = defaultdict(int)
    for mod in sorted(codes, key=lambda m: MODULES.index(m) if m in MODULES else 99):
        names = [n for n in codes[mod] if wanted(n)]
        if not names:
            continue
        c = defaultdict(int)
        for n in names:
            code = codes[mod][n]
            if code is None:
                c["untested"] += 1
            elif n in equivalent and code not in KILLED:
                c[equivalent[n][0]] += 1
                listed.append((n, equivalent[n]))
            elif code in KILLED:
                c["killed"] += 1
            else:
                c["survived" if code in SURVIVED else "no tests" if code in NO_TESTS else "other"] += 1
                survivors.append((n, code))
        tested = len(names) - c["untested"]
        denom = tested - c["equivalent"] - c["message"]
        score = 100 * c["killed"] / denom if denom else float("nan")
        secs = sum(v["seconds"] for k, v in times.items() if k == mod or k.startswith(mod + ".x"))
        rows.append((mod, len(names), tested, c, score, secs))
        for k in ("killed", "equivalent", "message", "survived", "no tests", "other", "untested"):
            tot[k] += c[k]
        tot["total"] += len(names)
        tot["tested"] += tested
        tot["seconds"] += secs
    print()
    print(f"{'module':18} {'mutants':>7} {'tested':>6} {'killed':>6} {'equiv':>5} {'msg':>4} {'surv':>4} "
          f"{'notest':>6} {'score':>6} {'time':>7}")
    for mod, n, tested, c, score, secs in rows:
        print(f"{mod:18} {n:7d} {tested:6d} {c['killed']:6d} {c['equivalent']:5d} {c['message']:4d} "
              f"{c['survived']:4d} {c['no tests']:6d} {score:5.1f}% {secs:6d}s")
    denom = tot["tested"] - tot["equivalent"] - tot["message"]
    score = 100 * tot["killed"] / denom if denom else float("nan")
    print(f"{'all':18} {tot['total']:7d} {tot['tested']:6d} {tot['killed']:6d} {tot['equivalent']:5d} "
          f"{tot['message']:4d} {tot['survived']:4d} {tot['no tests']:6d} {score:5.1f}% {tot['seconds']:6d}s")
    if tot["untested"]:
        print(f"({tot['untested']} mutants not tested yet)")
    print(f"\nmutation score: {score:.1f}% of {denom} non-equivalent mutants killed")
    if listed:
        print(f"\nlisted as equivalent / message text ({len(listed)}, reasons in {EQUIVALENT.relative_to(ROOT)}):")
        for n, (kind, reason) in listed:
            print(f"  {kind:10} {n}: {reason}")
    print(f"\nsurviving mutants ({len(survivors)}):")
    for n, code in survivors:
        status = "survived" if code in SURVIVED else "no tests" if code in NO_TESTS else f"exit {code}"
        print(f"  {status:8} {n}: {changed_lines(n, paths[n])}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", default="", help="comma-separated modules or mutant-name globs (default: all six)")
    ap.add_argument("--jobs", type=int, default=1, help="mutmut worker processes (default 1)")
    ap.add_argument("--fresh", action="store_true", help="delete mutants/ first (new mutants and stats)")
    ap.add_argument("--retest", action="store_true",
                    help="re-run only the mutants that were not killed last time (after strengthening tests)")
    ap.add_argument("--report-only", action="store_true", help="print the report of the last runs")
    a = ap.parse_args()
    targets = [t.strip() for t in a.modules.split(",") if t.strip()] or MODULES
    if a.fresh and (ROOT / "mutants").exists():
        shutil.rmtree(ROOT / "mutants")
    if not a.report_only:
        t0 = time.time()
        run_targets(targets, a.jobs, a.retest)
        print(f"=== mutation run: {time.time() - t0:.0f} s in all")
    return report(targets)


if __name__ == "__main__":
    sys.exit(main())
