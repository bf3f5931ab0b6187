# Everyday targets. `make demo` and `make test` work on a fresh machine (Python 3.10+, pip).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the CPU-only torch build (a few hundred MB instead of the default 6 GB with CUDA): make demo TORCH_INDEX=$(CPU_TORCH)
TORCH_INDEX ?=
CPU_TORCH := https://download.pytorch.org/whl/cpu
DEMO := runs/demo-digits-cnn
export DEEPRECIPE_DATA ?= $(abspath ../shared/data)

.PHONY: setup demo test lint format bench clean constraints

$(BIN)/deeprecipe: pyproject.toml constraints-ci.txt
	@echo "setting up $(VENV): deeprecipe, torch and the rest (the first time: a few minutes of downloads)"
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/pip install -c constraints-ci.txt --index-url $(TORCH_INDEX) torch torchvision)
	$(BIN)/pip install -c constraints-ci.txt -e '.[dev]'
	touch $@

setup: $(BIN)/deeprecipe

demo: setup  ## train the default recipe on the bundled digits, evaluate, write the report (again: a fresh run)
	@if [ -d $(DEMO) ]; then echo "removing the previous demo run $(DEMO)"; rm -rf $(DEMO); fi
	$(BIN)/deeprecipe train digits-cnn --out $(DEMO) --set train.device=cpu
	$(BIN)/deeprecipe eval $(DEMO)
	@echo "the deeprecipe command is $(BIN)/deeprecipe ('. $(BIN)/activate' puts it on the PATH)"
	@echo "report: $(DEMO)/report.html"

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

# constraints-ci.txt pins every package `make setup` and CI install, the transitive ones too: pip-compile (pip-tools,
# in the dev extra) resolves pyproject.toml with all its extras through pip's own index configuration, on Linux x86-64
# with the venv's Python. torch and torchvision stay at the releases CI machines hold as local wheels (TORCH_PINS); the
# CUDA build's nvidia-* packages are pinned with them; pip (`make setup` upgrades it) and deeprecipe itself (the dev
# extra names it) are left out. Existing pins are kept where they still fit:
# `make constraints COMPILE_ARGS=--upgrade` moves every pin to the newest release.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
COMPILE_ARGS ?=
constraints: setup
	printf '%s\n' $(TORCH_PINS) | CUSTOM_COMPILE_COMMAND="make constraints" $(BIN)/pip-compile -q $(COMPILE_ARGS) \
		--all-extras --strip-extras --unsafe-package pip --unsafe-package deeprecipe \
		--no-emit-index-url --no-emit-find-links \
		--output-file constraints-ci.txt pyproject.toml -

clean:
	rm -rf runs .pytest_cache
