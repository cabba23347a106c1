# lossd — the commands a person and CI use. Each target installs what it needs first.

PYTHON ?= python3
VENV ?= .venv
# torch is installed before the project so that pip never resolves it to a multi-GB
# CUDA build on a CPU machine. Override for a GPU box, e.g. TORCH="torch==2.13.0 --index-url ...".
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PIP := $(BIN)/python -m pip --quiet --disable-pip-version-check

.PHONY: install test serve lint format proto bench clean

install: $(STAMP)  ## .venv/ with torch, lossd (editable) and the test and lint tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[test,lint]"
	touch $@

test: install  ## the whole suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

serve: install  ## a server on localhost:50051 (SERVE_ARGS="--port 6000" to change)
	$(BIN)/lossd serve $(SERVE_ARGS)

lint: install  ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy losses server client cli

format: install  ## apply ruff's formatting and safe fixes
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

proto: install  ## regenerate the committed gRPC stubs from proto/lossd/v1/*.proto
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto \
		--grpc_python_out=proto proto/lossd/v1/*.proto

bench: install  ## the benchmark table (BENCH_ARGS="--quick" for a short run)
	$(BIN)/lossd bench $(BENCH_ARGS)

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
