# One entry point per job: install, demo, test, bench, lint.
# Everything runs from a virtual environment in $(VENV), created on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0

.PHONY: install demo test bench lint clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes, so a second `make install` is instant.
# torch is pinned and installed first: an unpinned torch would pull CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[test,data]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/landscape demo --out results/demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m pipeline.bench --out results/bench.json

lint: install
	$(VENV)/bin/ruff check pipeline tests
	$(VENV)/bin/ruff format --check pipeline tests

clean:
	rm -rf $(VENV) results build *.egg-info
