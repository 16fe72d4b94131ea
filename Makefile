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
