#!/bin/bash
# The one-line breaks of issue 26, each applied to a copy of the tree (never the working tree): the tests that
# claim the guarantee must fail for every one. Usage: bash tests/mutation_examples.sh (about 1 minute).
set -u
SRC=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$SRC/.venv/bin/python}  # PY=/path/to/python for a checkout without its own .venv
W=$(mktemp -d)
run() {  # name file python-old python-new tests...
  name=$1; file=$2; old=$3; new=$4; shift 4
  rm -rf $W; mkdir -p $W; (cd $SRC && tar --exclude=.venv --exclude=mutants --exclude=.git -cf - .) | (cd $W && tar xf -)
  python3 - "$W/$file" "$old" "$new" <<'PY'
import sys
p, old, new = sys.argv[1:]
s = open(p).read()
assert s.count(old) >= 1, f"pattern not found in {p}: {old}"
open(p, "w").write(s.replace(old, new, 1))
PY
  (cd $W && $PY -c "import alfcache, probes; assert alfcache.__file__.startswith('$W'), alfcache.__file__" ) || exit 1
  out=$(cd $W && timeout 600 $PY -m pytest -q -p no:cacheprovider "$@" 2>&1 | tail -1)
  case "$out" in *failed*) echo "killed   $name: $out" ;; *) echo "SURVIVED $name: $out"; survived=1 ;; esac
}
survived=0
run pair-preprocessing alfcache/format.py '("preprocessing", "preprocessing"), ' '' tests/test_guarantees.py
run write-in-place alfcache/format.py 'tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")' 'tmp = path' tests/test_guarantees.py tests/test_wrong_numbers.py -k "atomic or whole"
run nan-only alfcache/extract.py 'finite = torch.isfinite(t)' 'finite = ~torch.isnan(t)' tests/test_guarantees.py tests/test_errors.py -k "finite or nan or float16"
run batch-rule probes/protocol.py 'rest >= 0.5 * b' 'rest > 0.5 * b' tests/test_guarantees.py tests/test_protocol.py -k batch
run pool-eps probes/pool.py 'mu[sl], r[sl] = token_stats(xc, eps)' 'mu[sl], r[sl] = token_stats(xc, 1e-6)' tests/test_guarantees.py tests/test_protocol.py tests/test_probes.py -k "eps or authors or factored"
run verify-test-only probes/runner.py 'for split, p in where.items():' 'for split, p in list(where.items())[1:]:' tests/test_guarantees.py -k verif
run clip-one-norm probes/optim.py 'coef = (max_norm / (norm + 1e-6)).clamp_(max=1.0)
            self.grad.mul_(coef.unsqueeze(1))' 'coef = (max_norm / (norm.norm() + 1e-6)).clamp_(max=1.0)
            self.grad.mul_(coef)' tests/test_guarantees.py tests/test_probes.py -k "grid or clip"
rm -rf $W
exit $survived
