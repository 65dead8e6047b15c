# The README's two commands are `make demo` and `make test`; each sets up everything itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install services migrate demo test lint bench chaos fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "omniroute needs Python >= 3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

services: install
	bash scripts/ensure-services.sh

migrate: services
	$(BIN)/omniroute migrate --create-database

demo: migrate
	$(BIN)/omniroute demo $(DEMO_ARGS)

test: services
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: migrate
	$(BIN)/python -m bench $(BENCH_ARGS)

# Full-size versions of the suites whose short versions run in `make test`.
chaos: services
	OMNIROUTE_CHAOS_SCALE=$${OMNIROUTE_CHAOS_SCALE:-1} $(BIN)/pytest tests/chaos -m chaos $(PYTEST_ARGS)

fuzz: services
	OMNIROUTE_FUZZ_EXAMPLES=$${OMNIROUTE_FUZZ_EXAMPLES:-20000} $(BIN)/pytest tests/fuzz -m fuzz -s $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
