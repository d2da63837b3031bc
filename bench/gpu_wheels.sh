#!/usr/bin/env bash
# Fetches, on a machine with a package index, the wheels the lent GPU machine lacks
# (it reaches no registry: Python 3.12, torch, triton, transformers and peft are there)
# into .whl, which git ignores and the device tool carries (`carry: [".whl"]`), for
# bench/gpu_session.sh. About 50 MB; the device tool carries at most 64 MiB in all.
# grpcio and protobuf at the versions the generated stubs need (clients/python/hotswap/v1).
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  bitsandbytes==0.50.2 grpcio==1.85.4 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2
ls -la .whl
