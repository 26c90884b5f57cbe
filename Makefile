# Two commands for a new machine: `make demo` and `make test`.
# Both create .venv on first use (PyTorch 2.14.1 + torchvision 0.29.1, the package with all extras).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.fiber-plugins-installed
DEMO_OUT ?= demo-out

# SAELens overlay, for tests/adapters/test_sae.py::test_saelens_sae only. Every sae-lens release
# requires transformer-lens<4 and `import sae_lens` imports transformer_lens.HookedTransformer, so
# it cannot live in .venv next to the transformer-lens 4.x of the `lens` extra. To test the SAE
# adapter against the real SAELens classes anyway, the pinned sae-lens, a transformer-lens 3.x and
# the few pure-Python packages they need that .venv lacks are installed with --no-deps into their
# own folder (everything else -- torch, transformers, datasets, ... -- comes from .venv). The test
# runs its check in a subprocess with PYTHONPATH=$(SAELENS_OVERLAY), where that transformer_lens
# shadows 4.x; .venv's own packages are never changed. Rebuilt from scratch when the pins change.
SAELENS_OVERLAY := $(VENV)/saelens-overlay
SAELENS_STAMP   := $(VENV)/.saelens-overlay-installed
SAELENS_PINS    := sae-lens==6.54.12 transformer-lens==3.9.0 \
                   better-abc==0.0.3 simple-parsing==0.1.9 docstring-parser==0.18.0

.PHONY: demo test test-all test-browser lint bench notebooks clean-venv saelens-overlay

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[all,dev]"
	touch $(STAMP)

$(SAELENS_STAMP): $(STAMP) Makefile
	rm -rf $(SAELENS_OVERLAY) $(SAELENS_STAMP)
	$(BIN)/python -m pip install -q --no-deps --only-binary=:all: \
		--target $(SAELENS_OVERLAY) $(SAELENS_PINS)
	touch $(SAELENS_STAMP)

saelens-overlay: $(SAELENS_STAMP)

demo: $(STAMP)
	$(BIN)/fiber-plugins demo --out $(DEMO_OUT) --overwrite

test: $(STAMP) $(SAELENS_STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP) $(SAELENS_STAMP)
	$(BIN)/python -m pytest -q -m "not gpu"

# the atlas page in headless Chromium (installed with apt-get when missing; needs root or sudo)
test-browser: $(STAMP)
	command -v chromium >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }
	$(BIN)/python -m pytest -q -m browser

# write the three example notebooks and execute them in place (outputs committed; ~1-2 min each)
notebooks: $(STAMP)
	$(BIN)/python notebooks/_make_notebooks.py
	cd notebooks && ../$(BIN)/jupyter-execute --inplace captum_companion.ipynb sae_feature_inspection.ipynb neuron_concept_validation.ipynb

bench: $(STAMP)
	$(BIN)/fiber-plugins bench color-mnist --out benchmarks/results/color-mnist --overwrite
	$(BIN)/python benchmarks/gpu_ndtm.py

lint: $(STAMP)
	$(BIN)/python -m ruff check src tests examples benchmarks
	$(BIN)/python -m ruff format --check src tests examples benchmarks
	$(BIN)/python -m mypy src

clean-venv:
	rm -rf $(VENV)
