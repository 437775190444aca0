#!/usr/bin/env bash
# Wheels that a GPU host without access to the package index needs to run kvrack's GPU checks
# (device-check.sh): the pinned dependencies that a CUDA Python image (PyTorch, CuPy, NumPy, typer,
# rich, uvloop, xxhash, pytest already there) lacks, for that image's CPython. Run on a machine with
# pip access; the wheels land in .whl/ (ignored by git), which travels with the tree.
#   PY=3.12 bash tests/gpu/fetch-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-3.12}
tag=${PY/./}
mkdir -p .whl
for req in msgspec==0.22.0 blake3==1.0.11 lmdb==3.0.0; do
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$PY" --implementation cp --abi "cp$tag" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$req"
done
# sdnotify is published as a source archive only: build its (pure Python) wheel here
python3 -m pip wheel --quiet --disable-pip-version-check --no-deps -w .whl sdnotify==0.3.2
ls -l .whl
