#!/usr/bin/env bash
# kvrack's GPU checks on a CUDA host that cannot reach the package index: the HBM tier's tests, GDS, the
# native primitives, and `kvrack bench hbm`. Needs python3 with cupy, numpy, pytest, pytest-timeout,
# typer, rich, uvloop, xxhash and setuptools (a CUDA Python image has them), a C compiler, and the
# wheels of tests/gpu/fetch-wheels.sh in .whl/. Logs and JSON go to $OUT (default /tmp/kvrack-gpu).
#   bash tests/gpu/device-check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/kvrack-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 --version
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kvrack-deps \
    .whl/*.whl || exit 1
# builds kvrack._native with this host's python and compiler; nothing fetched
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
    --target /tmp/kvrack-pkg . || exit 1
export PYTHONPATH=/tmp/kvrack-pkg:/tmp/kvrack-deps
# on a GPU host an absent HBM tier is a failure, not a skip: say why and stop
python3 -c "import sys; from kvrack import _native; from kvrack.tiers.hbm import probe; \
print('native', _native.primitives()); ok, why = probe(0); print('hbm tier', 'present' if ok else 'ABSENT: ' + why); \
sys.exit(0 if ok else 2)" 2>&1 | tee "$OUT/probe.txt" || exit 2
rc=0
timeout 420 python3 -m pytest -q -p no:cacheprovider -rs tests/test_hbm.py tests/test_gds.py tests/test_native.py \
    2>&1 | tee "$OUT/pytest-gpu.log" || rc=1
timeout 240 python3 -m kvrack.cli.main bench hbm --json "$OUT/bench-hbm.json" 2>&1 \
    | tee "$OUT/bench-hbm.log" || rc=1
exit $rc
