# Two front doors for a fresh machine: `make demo` (whole pipeline on digits) and `make test`.
# Maintainers: `make publish-digits` after `dvc repro` (docs/dvc.md, "Pretrained artifacts").
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: env demo test publish-digits clean

$(BIN)/ncis: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

env: $(BIN)/ncis

# `ncis run`, then the same classifier trained without outliers, side by side (benchmarks/demo.py).
demo: env
	$(BIN)/python benchmarks/demo.py

# Two workers, each taking whole test files (their module fixtures are built once).
test: env
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# Push every output of dvc.lock to the in-repo remote dvc-store/, drop what dvc.lock no longer
# names, and check the remote; then commit dvc.lock and dvc-store/.
publish-digits: env
	$(BIN)/ncis publish --prune

clean:
	rm -rf outputs mlruns
