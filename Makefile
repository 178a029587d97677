# One entry point for humans and CI. `make test` and `make demo` set themselves up.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup lint format test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build of torch lies on this disk; install it first so nothing pulls a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

lint: setup
	$(BIN)/ruff check thinkforge tests bench
	$(BIN)/ruff format --check thinkforge tests bench
	$(BIN)/mypy thinkforge

format: setup
	$(BIN)/ruff check --fix thinkforge tests bench
	$(BIN)/ruff format thinkforge tests bench

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: setup
	$(BIN)/python -m thinkforge.demo

bench: setup
	$(BIN)/python bench/api_bench.py

clean:
	rm -rf $(VENV) .thinkforge build *.egg-info .pytest_cache .mypy_cache .ruff_cache
