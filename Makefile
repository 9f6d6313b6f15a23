# Two commands on a fresh machine: `make demo` and `make test`. Both build on `make setup`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed before the project so pip never resolves the range to a multi-GB CUDA build
# on a CPU box: 2.13.0 is the CPU wheel that lies on disk here (/opt/wheels). Elsewhere pip picks
# the build for that machine (CUDA on a GPU box); override with `make setup TORCH='torch==2.9.1'`.
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet '$(TORCH)'
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(BIN)/keel demo

test: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) runs data
