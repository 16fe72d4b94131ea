VENV ?= .venv
PY := $(VENV)/bin/python
ALF := $(VENV)/bin/alf
PYTEST_ARGS ?=

.PHONY: install test demo reproduce reproduce-mini bench clean

install:
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -e ".[test]"

# pytest exit 5 ("no tests collected") must not fail the suite
test:
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# Offline demo on embedded real data (scikit-learn digits) with a small RANDOM-weight ViT.
DEMO ?= demo
demo:
	$(ALF) build-random-model $(DEMO)/model
	$(ALF) extract --model local-dir:$(DEMO)/model --dataset digits --out $(DEMO)/features --workers 0
	$(ALF) ls $(DEMO)/features
	$(ALF) probe --store-root $(DEMO)/features --grid quick --head linear,linear-clsap,concat,alf --out $(DEMO)/results
	@echo "NOTE: the demo model has random weights; the numbers only show the pipeline works end to end."

clean:
	rm -rf $(DEMO) .pytest_cache
