# The project's verbs. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install serve test pytest lint protos protos-check bench clean redis-server cluster cluster-down

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "asynccas needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

## Start the server with the embedded default: disk + SQLite under $XDG_CACHE_HOME/asynccas.
serve: install
	$(BIN)/asynccas serve $(ARGS)

## Everything CI checks: generated code current, lint, then the test suite.
test: install protos-check lint pytest

pytest: install redis-server
	$(BIN)/pytest $(ARGS)

## The Redis tests start their own redis-server processes (one over TLS, with a certificate
## made by openssl); make sure both binaries exist.
redis-server:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	[ -z "$$missing" ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "The tests need:$$missing. Install the Debian/Ubuntu packages of that name" \
	         "(Redis >= 6.2 built with TLS) and run make test again." >&2; exit 1; \
	  fi; }

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

protos: install
	$(BIN)/python scripts/gen_protos.py

protos-check: install
	$(BIN)/python scripts/gen_protos.py --check

bench: install
	$(BIN)/python -m benchmarks $(ARGS)

## A local cluster on loopback ports: Redis, SeaweedFS (S3) and two asynccas frontends over
## them, in the background; prints "frontend grpc://127.0.0.1:PORT" for each. Data and logs
## in .cluster/. ARGS="--frontends 3 --max-size 1G --isolation per-instance" to vary it.
cluster: install redis-server
	$(BIN)/python scripts/local_cluster.py up $(ARGS)

## Stop everything `make cluster` started and remove .cluster/.
cluster-down:
	$(BIN)/python scripts/local_cluster.py down $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
