# make demo / make test create .venv when missing and reinstall only when pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision pinned to the versions this project is tested with (local wheels on our machines).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: help demo test bench clean

# The first target is what a bare `make` runs: a list of the targets, not a torch install.
help:
	@echo "make demo    create .venv if missing, install mctool, run the demo on digits into demo-out/"
	@echo "make test    same install step, then run the pytest suite (CPU only, tiny models)"
	@echo "make bench   same install step, then time the hot paths into bench-out/results.json"
	@echo "make clean   remove demo-out/, bench-out/, .pytest_cache and build outputs (build/, *.egg-info)"
	@echo "PYTHON=python3.12 picks the interpreter that creates .venv (default: python3)"

$(VENV)/.torch-installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch-installed
	$(PY) -m pip install --quiet -e ".[test,html]"
	touch $@

demo: $(VENV)/.installed
	$(PY) scripts/demo.py demo-out

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/bench.py --out bench-out/results.json

clean:
	rm -rf demo-out bench-out .pytest_cache build mctool.egg-info
