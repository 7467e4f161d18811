# One entry point for people and CI. Every target installs what it needs first (idempotent).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
JOBS    ?= examples/prompts.jsonl
OUT     ?= out/results.jsonl

.PHONY: install test lint typecheck check batch bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

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
batch: $(STAMP)
	mkdir -p $(dir $(OUT))
	$(BIN)/tokenhive batch $(JOBS) -o $(OUT)

bench: $(STAMP)
	$(BIN)/python -m bench.broker
	$(BIN)/python -m bench.gguf
	$(BIN)/python -m bench.batching
	$(BIN)/python -m bench.remote

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
