# The two commands (README): `make demo` runs the whole loop on the embedded world, `make test` runs the tests.
# Each creates .venv on first use and installs from constraints.txt, the lock of exact versions that pass
# (compiled by uv from pyproject.toml's ranges; `make lock` refreshes it). torch and triton are not in the
# lock: a CPU machine gets TORCH_SPEC (the 2.13.0 CPU build), a CUDA machine pre-installs its own torch build
# (or sets TORCH_SPEC) and then `make install EXTRAS=dev,postgres,argilla,gpu`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0 triton==3.9.0
LOCK := constraints.txt
EXTRAS ?= dev,postgres,argilla
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# `make test` runs the default suite on this many pytest-xdist workers (each test still runs whole in one
# process; every fixture makes its own ports, folders and PostgreSQL databases). 1: one process, no xdist.
TEST_WORKERS ?= 2
# Where `make lock` finds the CPU build of torch that the lock is resolved against (this image keeps it on
# local disk; elsewhere PyTorch's CPU index).
TORCH_WHEELS ?= $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)

.PHONY: install services demo test test-all test-latest lint lock bench clean

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	@touch $(STAMP)

install: $(STAMP)

services:  # Chromium, PostgreSQL, Redis, argilla-server's venv (.ci/services; GLMWB_SKIP_SERVICES=1 skips)
	@.ci/services

demo: install
	$(VENV)/bin/glmwb run recipes/quickstart.yaml

test: install services
	$(PY) -m pytest -q $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS)) $(PYTEST_ARGS)

test-all: install services
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

# The newest versions pyproject.toml's ranges allow, in a separate venv, so an upstream release that breaks
# us is seen here before a user sees it (not part of CI: CI installs from the lock).
test-latest: services
	rm -rf .venv-latest
	python3 -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q $(TORCH_SPEC)
	.venv-latest/bin/python -m pip install -q --upgrade -e ".[$(EXTRAS)]"
	.venv-latest/bin/python -m pip list --format=freeze > .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest -q $(PYTEST_ARGS)

# import-linter (grimp) reads a package from its folder: build/lint/glmwb links the seven folders under the
# namespace as a wheel would lay them out (the editable install maps them through an import hook it cannot read).
lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	@rm -rf build/lint && mkdir -p build/lint/glmwb
	@for d in kernels pretrain annotation rewards align ui recipes; do ln -s ../../../$$d build/lint/glmwb/$$d; done
	cd build/lint && PYTHONPATH=. ../../$(VENV)/bin/lint-imports --config ../../pyproject.toml

# Re-resolve pyproject.toml's ranges to today's newest versions for this Python, against the CPU torch.
lock:
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q "uv>=0.9"
	echo "torch==$$(echo '$(TORCH_SPEC)' | sed -E 's/.*torch==([^ ]+).*/\1/')" > $(VENV)/torch-pin.txt
	$(VENV)/bin/uv pip compile pyproject.toml --upgrade --quiet --extra dev --extra postgres --extra argilla \
	    --python $(PY) --python-platform x86_64-manylinux_2_28 $(TORCH_WHEELS) \
	    --constraint $(VENV)/torch-pin.txt --no-emit-package torch --no-emit-package triton \
	    --custom-compile-command "make lock" -o $(LOCK)

bench: install
	$(PY) -m glmwb.pretrain.bench_throughput

clean:
	rm -rf runs .pytest_cache .venv-latest
