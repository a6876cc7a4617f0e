# The README, CI (.ci/run) and developers all use these targets.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install test lint typecheck pytest demo up bench soak soak-services clean

# Extras: `local` is moto's server for `make up`/`make demo`; `dev` the test tools (it includes `local`).
$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "make: jiralake needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) --version 2>/dev/null || echo 'not found')." \
	    "Pass one, e.g. make $(or $(MAKECMDGOALS),install) PYTHON=python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[local,dev]'
	touch $@

## promtool (Prometheus's rule checker) for the alert-rule tests in tests/test_deploy.py: the one on
## the PATH if there is one, else taken out of Debian's prometheus package where apt-get can fetch it
## (no root needed). Elsewhere those tests skip (docs/operations.md) and install goes on.
$(BIN)/promtool: | $(BIN)/.installed
	@if command -v promtool >/dev/null 2>&1; then ln -sf "$$(command -v promtool)" $@; \
	elif command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then \
	  tmp=$$(mktemp -d) && ( cd $$tmp && apt-get download -qq prometheus 2>/dev/null \
	    && dpkg-deb -x prometheus_*.deb x && cp x/usr/bin/promtool $(abspath $@) ) \
	    || echo "make: could not fetch Debian's prometheus package; the promtool tests will skip" >&2; \
	  rm -rf $$tmp; \
	else echo "make: no promtool and no apt-get; the promtool tests will skip" >&2; fi

install: $(BIN)/.installed $(BIN)/promtool

## The whole test suite: lint, strict type check, then pytest (real Postgres, moto's HTTP server).
test: lint typecheck pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

## pytest in PYTEST_WORKERS processes (pytest-xdist): most tests wait on moto, PostgreSQL or a child
## process rather than compute, so three share 2 cores well (on this project's 2-core machine: about
## 8 minutes, against 11-17 in one process). PYTEST_WORKERS=0 runs them in this process (pdb, -s).
PYTEST_WORKERS ?= 3
pytest: install
	$(BIN)/pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

## The whole pipeline on an embedded local stack, fed with the sample webhooks; exits when done.
demo: install
	$(BIN)/jiralake up --demo

## The local stack, left running (Ctrl-C stops it).
up: install
	$(BIN)/jiralake up

## Benchmarks (not part of the tests): results go to docs/benchmarks.md.
bench: install
	$(BIN)/python -m bench.run_all

## The fault-injection test at soak size and the receiver fuzzing with a bigger budget (slow):
## docs/reliability.md, docs/receiver.md.
soak: install
	JIRALAKE_SOAK=1 $(BIN)/pytest -q -p no:cacheprovider tests/test_fault_injection.py $(PYTEST_ARGS)
	JIRALAKE_FUZZ_EXAMPLES=2000 $(BIN)/pytest -q -p no:cacheprovider tests/test_hostile_input.py $(PYTEST_ARGS)

## The receiver, consumer and scheduled exporter as processes under steady webhook traffic for about
## 12 minutes, sampled for leaks (RSS, fds, threads, metric series, tasks): docs/reliability.md.
soak-services: install
	$(BIN)/python -m bench.soak_services $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
