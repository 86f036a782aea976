# make demo: two nodes exchanging real messages on SQLite.  make test: lint, types, the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test lint typecheck pytest bench clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(BIN)/exchange demo --workdir keys/demo

lint: $(STAMP)
	$(BIN)/ruff check exchange tests bench migrations
	$(BIN)/ruff format --check exchange tests bench migrations

typecheck: $(STAMP)
	$(BIN)/mypy

system-deps:
	bash .ci/system-deps

# one worker per CPU; a test file runs whole on one worker (its module fixtures, e.g. two running
# nodes, are started once)
pytest: $(STAMP) system-deps
	$(BIN)/pytest -n auto --dist loadfile --durations=25

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python bench/exchange_throughput.py
	$(BIN)/python bench/ledger.py
	$(BIN)/python bench/merkle_proofs.py
	$(BIN)/python bench/policy_engine.py

clean:
	rm -rf $(VENV) keys/demo .pytest_cache .mypy_cache .ruff_cache
