# Two commands do everything: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/data)
export SAFESTEER_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/README.md),$(SHARED_DATA),)

.PHONY: venv install install-test run test test-all clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch==2.13.0 is a local CPU wheel here; a looser spec would download a multi-GB CUDA build.
# An already-installed torch (e.g. a GPU build) is respected.
$(VENV)/.torch: $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	@touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install -q -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install -q -e ".[test]"
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	$(BIN)/safesteer run --config configs/default.toml --out runs/default

# Unit + integration tests (SmolLM2, ../shared/data); `slow` ones (minutes each) only in test-all.
test: install-test
	$(BIN)/python -m pytest -m "not slow"

test-all: install-test
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
