#!/usr/bin/env bash
# Regenerates the committed CPU baseline in benchmarks/results/ (`make bench-baseline`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p benchmarks/results
$PY -m peft_kernels.bench --no-progress --out benchmarks/results "$@" | tee benchmarks/results/bench.txt
env -u TRITON_INTERPRET $PY -m peft_kernels.bench --gpu-resources --out benchmarks/results | tee benchmarks/results/gpu_resources.txt
$PY -m peft_kernels.bench --op meta | tee benchmarks/results/meta.txt
