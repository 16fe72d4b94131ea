"""Print the floor of every dependency in pyproject.toml as `name==version` (pip/uv constraints format).

`make test-floor` installs alfcache with these constraints: the lowest versions that [project].dependencies and the
`test` extra admit. Each requirement must carry a `>=` floor (and no `==`); anything else is an error here, so a new
dependency cannot slip in untested."""
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def floors(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"]) + list(project.get("optional-dependencies", {}).get("test", []))
    out, bad = [], []
    for r in reqs:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][A-Za-z0-9.]*)\s*(?:,\s*!=\s*[0-9][A-Za-z0-9.*]*\s*)*", r)
        if not m:
            bad.append(r)
        else:
            out.append(f"{m.group(1)}=={m.group(2)}")
    if bad:
        sys.exit(f"pyproject.toml: every dependency needs a plain '>=' floor (optionally with '!=' exclusions): {bad}")
    return out


if __name__ == "__main__":
    print("\n".join(floors()))
