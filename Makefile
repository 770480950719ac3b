# Two front doors for a fresh machine: `make demo` (whole pipeline on digits) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: env demo test clean

$(BIN)/ncis: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

env: $(BIN)/ncis

demo: env
	$(BIN)/ncis run

test: env
	$(BIN)/python -m pytest -q

clean:
	rm -rf outputs mlruns
