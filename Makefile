# One entry point for humans and CI. `make test` and `make demo` set themselves up.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup lint format test test-fast demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build of torch lies on this disk; install it first so nothing pulls a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Helm for the chart tests, fetched once; without it those tests skip and say so.
$(BIN)/helm: | $(STAMP)
	@$(BIN)/python infra/fetch_helm.py $@ || echo "helm not fetched: the chart tests will skip"

lint: setup
	$(BIN)/ruff check thinkforge tests bench infra
	$(BIN)/ruff format --check thinkforge tests bench infra
	$(BIN)/mypy thinkforge

format: setup
	$(BIN)/ruff check --fix thinkforge tests bench infra
	$(BIN)/ruff format thinkforge tests bench infra

test: lint $(BIN)/helm
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The edit-test loop: lint and every test that starts no Ray cluster (a conftest check
# fails a test that starts Ray without the `ray` marker). `make test` stays the full suite.
test-fast: lint
	$(BIN)/python -m pytest -m "not ray" $(PYTEST_ARGS)

demo: setup
	$(BIN)/python -m thinkforge.demo

bench: setup
	$(BIN)/python bench/api_bench.py

clean:
	rm -rf $(VENV) .thinkforge build *.egg-info .pytest_cache .mypy_cache .ruff_cache
