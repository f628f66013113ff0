# Two entry points for a fresh machine (see README.md):
#   make serve  - set up .venv and serve the embedded default model on 127.0.0.1:8000
#   make test   - set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup serve test bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	# the CPU build of torch that lies on this machine's disk; other specs download CUDA builds
	$(VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

serve: setup
	$(VENV)/bin/openmini serve $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q $(ARGS)

bench: setup
	$(VENV)/bin/python bench/bench_engine.py $(ARGS)
