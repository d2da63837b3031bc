#!/usr/bin/env bash
# One device-tool call's worth of GPU checks, prepared so a session lent a GPU spends its
# minutes measuring, not setting up. Run from the repo root on the GPU machine, with the
# wheels that machine lacks carried in .whl (bench/gpu_wheels.sh fetches them here):
#
#   bash bench/gpu_session.sh tests           # Triton kernels, decode graphs, engine fidelity on CUDA (<= 3 min)
#   bash bench/gpu_session.sh syncs           # host-device syncs per decode step, by line (bench/gpu_syncs.py, <= 1.5 min)
#   bash bench/gpu_session.sh bench none      # bench_gpu.py, bf16: 8B shape, 1/64/512 adapters, eager and graphs (<= 5 min)
#   bash bench/gpu_session.sh bench nf4       # the same in NF4
#   bash bench/gpu_session.sh all             # tests, syncs, then bf16: one device call of at most ~9.5 minutes
#
# Each stage has its own time limit, so `all` ends inside the device tool's 10-minute call even when a
# stage hangs; bench_gpu.py prints each workload as it finishes, so a cut-off run still leaves numbers in
# its log. The first 8B run also builds the checkpoint and the adapters (minutes): BENCH_ARGS can shrink
# it (e.g. "--requests 128 --new-tokens 64 --adapter-counts 1,64").
#
# Logs and the RESULTS section go to $OUT (the device tool brings that folder back), or
# to /tmp/hotswap-gpu where OUT is unset. BENCH_ARGS adds or overrides bench_gpu.py flags; BENCH_TIMEOUT
# (seconds, default 300) bounds its stage, e.g. 560 when it runs alone in a call.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/hotswap-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
# hotswap is a namespace package spread over these folders; bench/ for bench_gpu's helpers.
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/server:$PWD/tuner:$PWD/clients/python:$PWD/bench:$PWD/tests

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.version.cuda)"
  python3 -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$OUT/env.txt"

run_tests() {
  # The kernels compiled for the GPU against the reference, then the engine on CUDA (Triton kernels)
  # against PEFT on the CPU: the same tests CI runs interpreted.
  timeout 180 python3 -m pytest -q -p no:cacheprovider -x -o addopts="" \
    tests/test_triton_kernels.py tests/test_static_decode.py tests/test_engine_fidelity.py tests/test_architectures.py \
    tests/test_engine_paged.py \
    -k "triton or lora_plan" \
    2>&1 | tee "$OUT/tests.log" | tail -15
}

run_bench() {
  local quant=$1
  # ${BENCH_ARGS:-} last: a session may shrink the run to fit its minutes.
  timeout "${BENCH_TIMEOUT:-300}" python3 bench/bench_gpu.py --quantization "$quant" --grpc-adapters 0 --out "$OUT/RESULTS-gpu.md" \
    --workdir /tmp/hotswap-bench-gpu ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench-$quant.log" | tail -25
}

run_syncs() {
  timeout 90 python3 bench/gpu_syncs.py 2>&1 | tee "$OUT/syncs.log" | tail -20
}

case "${1:-all}" in
  tests) run_tests ;;
  bench) run_bench "${2:-none}" ;;
  syncs) run_syncs ;;
  all) run_tests; run_syncs; run_bench none ;;
  *) echo "usage: $0 tests | syncs | bench none|nf4 | all"; exit 2 ;;
esac
