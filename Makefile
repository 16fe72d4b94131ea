VENV ?= .venv
PY := $(VENV)/bin/python
ALF := $(VENV)/bin/alf
UV_VERSION ?= 0.13.9
# uv run from the venv, on the venv (never a Python it downloads)
UV := UV_PROJECT_ENVIRONMENT=$(VENV) UV_PYTHON_DOWNLOADS=never $(VENV)/bin/uv
PYTEST_ARGS ?=
# the suite in parallel processes (one per core, at most 4; each builds its own session fixtures)
PARALLEL ?= -n auto --maxprocesses 4 --dist worksteal

.PHONY: install lock test test-envs test-floor test-keep-torch test-wheel mutate demo fetch reproduce reproduce-mini bench clean

# The exact set in uv.lock (every package, version and file hash), alfcache editable with the test, s3 and s3test extras.
# uv installs from its cache (~/.cache/uv, UV_CACHE_DIR) by hard links: a warm reinstall takes seconds.
# Refresh the lock with `make lock` (newest releases the ranges in pyproject.toml admit) and commit uv.lock.
install:
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	$(UV) sync --locked --inexact --compile-bytecode --extra test --extra s3 --extra s3test  # --inexact: keep uv and pip (not in the lock)

lock:
	$(UV) lock --upgrade

# Two passes: everything but the wall-clock tests in parallel, then those alone on an idle machine. The first pass
# prints its 15 slowest tests (what to trim when the suite nears its 15-minute budget).
# pytest exit 5 ("no tests collected", e.g. a PYTEST_ARGS filter that leaves one pass empty) is not a failure.
test:
	$(PY) -m pytest $(PARALLEL) -m "not serial" --durations=15 $(PYTEST_ARGS); a=$$?; [ $$a -eq 5 ] && a=0; \
	$(PY) -m pytest -m serial $(PYTEST_ARGS); b=$$?; [ $$b -eq 5 ] && b=0; \
	if [ $$a -ne 0 ] || [ $$b -ne 0 ]; then exit 1; fi

# Mutation testing (mutmut, [tool.mutmut] in pyproject.toml) of the modules that hold the guarantees, one module at
# a time, one worker (MUTATE_JOBS); prints each module's time, the score and the surviving mutants (docs/MUTATION.md).
# MODULES=probes.optim,probes.pool narrows it (a module or a mutant-name glob); FRESH=1 starts from new mutants;
# RETEST=1 re-runs only the mutants not killed last time.
MODULES ?=
MUTATE_JOBS ?= 1
mutate:
	$(PY) tests/mutation_run.py --jobs $(MUTATE_JOBS) $(if $(MODULES),--modules $(MODULES)) $(if $(FRESH),--fresh) $(if $(RETEST),--retest)

# Installation tests, each in an environment of its own under .envs/ (scripts/test_envs.py): the floor versions
# with the fast tests, the user's own torch kept by `pip install`, the wheel outside the tree. Needs `make install`
# (its uv) and PyPI or warm caches. Multi-GB installs: kept out of `make test`.
test-envs:
	$(PY) scripts/test_envs.py floor keep-torch wheel
test-floor:
	$(PY) scripts/test_envs.py floor
test-keep-torch:
	$(PY) scripts/test_envs.py keep-torch
test-wheel:
	$(PY) scripts/test_envs.py wheel

# Offline demo on embedded real data (scikit-learn digits) with a small RANDOM-weight ViT.
DEMO ?= demo
demo:
	$(ALF) build-random-model $(DEMO)/model
	$(ALF) extract --model local-dir:$(DEMO)/model --dataset digits --out $(DEMO)/features --workers 0
	$(ALF) ls $(DEMO)/features
	$(ALF) probe --store-root $(DEMO)/features --grid quick --head linear,linear-clsap,concat,alf --out $(DEMO)/results
	@echo "NOTE: the demo model has random weights; the numbers only show the pipeline works end to end."

clean:
	rm -rf $(DEMO) .pytest_cache .envs

# Where there is internet (a login node): weights and datasets of the study into the Hugging Face cache
# (HF_HOME / HF_HUB_CACHE); `make fetch CHECK=1` lists what is cached and what is missing.
fetch:
	$(ALF) fetch $(if $(MODELS),--model $(MODELS)) $(if $(DATASETS),--dataset $(DATASETS)) $(if $(CHECK),--check)

# The paper's study: 9 models x 19 datasets, every head, the authors' protocol; rerun to resume.
# Narrow it with MODELS=vit-b,clip-l DATASETS=fer2013 HEADS=linear,alf (comma-separated); SEEDS=3 for spread.
PROTOCOL ?= paper
SEEDS ?= 1
ROOT ?= .
# On Slurm: make reproduce EXECUTOR=slurm ROOT=/shared/me/alf SLURM_ARGS="--partition gpu --parallel 20"
EXECUTOR ?= local
SLURM_ARGS ?=
reproduce:
	$(ALF) reproduce --root $(ROOT) --protocol $(PROTOCOL) --seeds $(SEEDS) $(if $(MODELS),--models $(MODELS)) \
		$(if $(DATASETS),--datasets $(DATASETS)) $(if $(HEADS),--heads $(HEADS)) --executor $(EXECUTOR) $(SLURM_ARGS)

# Same pipeline and code on the embedded digits data with two small locally built (random-weight) models.
MINI ?= mini
MINI_HEADS ?= linear,linear-clsap,concat,alf
# The two models are built once (RANDOM_WEIGHTS.txt is the last file build-random-model writes): a rerun is a no-op.
reproduce-mini: $(MINI)/models/tiny-a/RANDOM_WEIGHTS.txt $(MINI)/models/tiny-b/RANDOM_WEIGHTS.txt
	$(ALF) reproduce --root $(MINI) --grid quick --workers 0 \
		--models local-dir:$(MINI)/models/tiny-a,local-dir:$(MINI)/models/tiny-b --datasets digits \
		--heads $(if $(HEADS),$(HEADS),$(MINI_HEADS))
$(MINI)/models/tiny-a/RANDOM_WEIGHTS.txt:
	$(ALF) build-random-model $(MINI)/models/tiny-a --embed-dim 48 --depth 4 --num-heads 3 --seed 0
$(MINI)/models/tiny-b/RANDOM_WEIGHTS.txt:
	$(ALF) build-random-model $(MINI)/models/tiny-b --embed-dim 64 --depth 6 --num-heads 4 --seed 1

# Benchmarks: each prints ratios measured within one run (results also in benchmarks/results/*.json).
bench:
	cd benchmarks && for b in bench_cli bench_offline bench_alf bench_extract bench_store bench_grid bench_sklearn bench_mmap bench_scaling bench_load bench_multi bench_s3; do \
		../$(PY) $$b.py || exit 1; done
	@if sinfo -h >/dev/null 2>&1; then cd benchmarks && ../$(PY) bench_study_submit.py; else echo "(no Slurm: bench_study_submit skipped; scripts/slurm.sh start)"; fi
