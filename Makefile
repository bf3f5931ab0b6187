# Everyday targets. `make demo` and `make test` work on a fresh machine (Python 3.10+, pip).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DEEPRECIPE_DATA ?= $(abspath ../shared/data)

.PHONY: setup demo test lint format bench clean

$(BIN)/deeprecipe: pyproject.toml constraints-ci.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints-ci.txt -e '.[dev]'
	touch $@

setup: $(BIN)/deeprecipe

demo: setup  ## train the default recipe on the bundled digits, evaluate, write the report
	$(BIN)/deeprecipe train digits-cnn --out runs/demo-digits-cnn --set train.device=cpu
	$(BIN)/deeprecipe eval runs/demo-digits-cnn

test: setup  ## the whole test suite (what CI runs)
	$(BIN)/python -m pytest -n 2 tests

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: setup
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: setup
	$(BIN)/python bench/classify_speed.py

clean:
	rm -rf runs .pytest_cache
