# The README's two commands are `make demo` and `make test`; each sets up everything itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-dev install-bench install-lint services browser migrate demo test lint bench chaos fuzz clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "omniroute needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# One stamp per set of extras, so each target installs only what it needs: `make demo` the
# product alone, `make test` the dev extra (pytest, linters), `make bench` the baselines.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[$(subst -,$(comma),$*)]'
	touch $@ $(VENV)/.installed  # the product came with it

comma := ,

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
install-bench: $(VENV)/.installed-bench
install-lint: $(VENV)/.installed-dev-bench  # mypy checks bench/ too

services:
	bash scripts/ensure-services.sh

migrate: install services
	$(BIN)/omniroute migrate --create-database

demo: migrate
	$(BIN)/omniroute demo $(DEMO_ARGS)

test: install-dev services browser
	$(BIN)/pytest $(PYTEST_ARGS)

# Debian's chromium for the console's browser tests: installed when missing and possible,
# otherwise those tests skip with the reason (the script never fails).
browser:
	bash scripts/ensure-browser.sh

lint: install-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install-bench migrate
	$(BIN)/python -m bench $(BENCH_ARGS)

# Full-size versions of the suites whose short versions run in `make test`.
chaos: install-dev services
	OMNIROUTE_CHAOS_SCALE=$${OMNIROUTE_CHAOS_SCALE:-1} $(BIN)/pytest tests/chaos -m chaos $(PYTEST_ARGS)

fuzz: install-dev services
	OMNIROUTE_FUZZ_EXAMPLES=$${OMNIROUTE_FUZZ_EXAMPLES:-20000} $(BIN)/pytest tests/fuzz -m fuzz -s $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
