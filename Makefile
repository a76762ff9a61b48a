# The two commands: `make run` (demo on the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run run-cluster test lint migrate bench bench-quick

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

migrate: install
	$(PY) manage.py migrate --noinput

run: migrate
	$(PY) manage.py run_demo --host $(HOST) --port $(PORT)

# Production mode: Postgres + Redis (this machine's services unless set), WORKERS uvicorn workers
# on ports 8001, 8002, …; the command creates the database if missing and migrates first.
WORKERS ?= 2
CLUSTER_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/baton
CLUSTER_REDIS_URL ?= redis://127.0.0.1:6379/1

run-cluster: install
	DATABASE_URL="$${DATABASE_URL:-$(CLUSTER_DATABASE_URL)}" REDIS_URL="$${REDIS_URL:-$(CLUSTER_REDIS_URL)}" \
		$(PY) manage.py run_cluster --workers $(WORKERS) --host $(HOST)

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

# Full benchmark (~15 min): docs/benchmarks.md + docs/bench-*.png. Needs Postgres and Redis on
# 127.0.0.1 (contender b); see bench/run.py.
bench: $(VENV)/.bench-installed
	$(PY) -m bench.run

# Smoke run (< 2 min) for CI: the harness's own tests (bench/test_bench.py), then
# bench/results/quick.md; fails only if a test fails or a contender cannot start.
bench-quick: $(VENV)/.bench-installed
	$(PY) -m pytest -q bench
	$(PY) -m bench.run --quick
