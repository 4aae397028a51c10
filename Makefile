# make demo / make test create .venv when missing and reinstall only when pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision pinned to the versions this project is tested with (local wheels on our machines).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench clean

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
	rm -rf demo-out bench-out .pytest_cache
