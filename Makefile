# The two commands in README.md: `make run` and `make test`. Everything else is a helper.
VENV := .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: run test bench bench-versus bench-digest lint venv clients distribution stack-up stack-down

run: venv clients
	deploy/with-stack $(PY) -m services.cli run-all

test: venv clients
	deploy/with-stack $(PY) -m pytest $(PYTEST_ARGS)

bench: venv $(VENV)/.bench-installed clients distribution
	deploy/with-stack $(PY) -m bench

# Layerlog's registry against CNCF Distribution on the same S3 (bench/versus.py); crane drives both.
bench-versus: venv $(VENV)/.bench-installed clients distribution
	deploy/with-stack $(PY) -m bench.versus

bench-digest: venv
	$(PY) -m bench.bench_digest

lint: venv
	$(VENV)/bin/ruff check services tests bench

stack-up: venv
	deploy/stack up

stack-down:
	deploy/stack down

venv: $(VENV)/.installed

# crane, oras, regctl and skopeo for tests/registry and the README's session; each installs once.
clients:
	deploy/clients install

# CNCF Distribution, the registry bench/versus.py measures against; the benchmark's only.
distribution:
	deploy/distribution install

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Layerlog needs Python 3.11 or newer; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@
