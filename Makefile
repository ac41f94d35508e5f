# `make test` and `make demo` set up everything they need from nothing but Python 3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo lint bench clean

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m ruff check deepseekv3 tests benchmarks examples
	$(PY) -m ruff format --check deepseekv3 tests benchmarks examples
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(VENV)/.installed
	$(VENV)/bin/deepseekv3 demo

lint: $(VENV)/.installed
	$(PY) -m ruff format deepseekv3 tests benchmarks examples
	$(PY) -m ruff check --fix deepseekv3 tests benchmarks examples

bench: $(VENV)/.installed
	$(PY) benchmarks/manifest.py --rerun

clean:
	rm -rf $(VENV) build *.egg-info
