# The two set-up commands (README): `make demo` runs the whole loop, `make test` runs the tests.
# Each creates .venv and installs on first use. On a CPU machine torch comes as the 2.13.0 CPU build
# (from local disk here); on a CUDA machine set TORCH_SPEC to what you want, or pre-install torch.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install services demo test test-all lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

services:  # Chromium and PostgreSQL for the browser / PostgreSQL tests (.ci/services; GLMWB_SKIP_SERVICES=1 skips)
	@.ci/services

demo: install
	$(VENV)/bin/glmwb run recipes/quickstart.yaml

test: install services
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: install services
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) -m glmwb.pretrain.bench_throughput

clean:
	rm -rf runs .pytest_cache
