# Two commands for a new machine: `make demo` and `make test`.
# Both create .venv on first use (PyTorch 2.14.1 + torchvision 0.29.1, the package with all extras).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.fiber-plugins-installed
DEMO_OUT ?= demo-out

.PHONY: demo test test-all lint bench clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[all,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fiber-plugins demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu"

bench: $(STAMP)
	$(BIN)/fiber-plugins bench color-mnist --out benchmarks/results/color-mnist
	$(BIN)/python benchmarks/gpu_ndtm.py

lint: $(STAMP)
	$(BIN)/python -m ruff check src tests

clean-venv:
	rm -rf $(VENV)
