# make run   — create .venv, install ntkgp, run the sinusoid experiment
# make test  — create .venv, install ntkgp with its test extra, run the test suite
# make lint  — ruff check and ruff format --check (what CI runs before the tests)
# make typecheck — mypy on ntkgp/ (configured in pyproject.toml)
# make bench — the NTK-MVM benchmark and the comparison with laplace-torch (benchmarks/)
# make docs  — the documentation site, offline, into site/ (mkdocs --strict: a warning fails; the tutorials run)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test lint typecheck bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test,lint,docs]"
	touch $@

run: $(VENV)/.installed
	$(BIN)/ntkgp run sinusoid

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q --durations=15

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/ntk_mvm.py
	$(BIN)/python benchmarks/laplace_vs_laplace_torch.py

docs: $(VENV)/.installed
	NTKGP_DATA=$${NTKGP_DATA:-../shared/data} NO_MKDOCS_2_WARNING=1 NTKGP_PROGRESS=0 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) results site *.egg-info
