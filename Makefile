# `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kvrack-installed
SOURCES := pyproject.toml setup.py $(wildcard native/*.c native/*.h)

.PHONY: run test test-all test-hugepages bench bench-check stress lint example clean

$(STAMP): $(SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,nixl]'
	@touch $(STAMP)

## run: start kvrackd in the foreground with the embedded default config
run: $(STAMP)
	$(VENV)/bin/kvrackd

## test: the default test run (what CI runs)
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider

## test-all: every test, slow ones included
test-all: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m ''

## bench: kvrack bench local, results in bench-local.json
bench: $(STAMP)
	$(VENV)/bin/kvrack bench local --json bench-local.json

## bench-check: the benchmark targets as assertions (tests/perf)
bench-check: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m perf tests/perf

## stress: multi-process CXL stress test (KVRACK_STRESS_SECONDS, default 60; KVRACK_STRESS_PROCS, default 6)
stress: $(STAMP)
	$(PY) -m pytest -q -s -p no:cacheprovider -m stress tests/test_cxl.py

## test-hugepages: the huge-page tests with a pool and a hugetlbfs mount made for them (root; restored after)
test-hugepages: $(STAMP)
	@set -e; old=$$(cat /proc/sys/vm/nr_hugepages); dir=$$(mktemp -d); \
	trap 'umount "$$dir" 2>/dev/null; rmdir "$$dir"; echo $$old > /proc/sys/vm/nr_hugepages' EXIT; \
	echo $$((old + 128)) > /proc/sys/vm/nr_hugepages; mount -t hugetlbfs -o pagesize=2M none "$$dir"; \
	KVRACK_TEST_HUGETLBFS="$$dir" $(PY) -m pytest -q -p no:cacheprovider -rs tests/test_hugepages.py \
		tests/test_dram_restart.py tests/test_cxl.py -k 'huge'

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

## example: regenerate deploy/kvrack.example.toml from the settings table
example: $(STAMP)
	$(VENV)/bin/kvrackd --write-example deploy/kvrack.example.toml

clean:
	rm -rf $(VENV) build *.egg-info pkg/_native*.so
