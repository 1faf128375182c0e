#!/usr/bin/env bash
# On this (CPU) machine: fetch the cp312 wheels the GPU machine lacks and split the big one into <= 55 MB parts,
# one folder per `run` call (a call carries at most 64 MiB). Untested end to end: no GPU was lent to the session
# that wrote it.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .gpu && mkdir -p .gpu/wheels
pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    -d .gpu/wheels "onnxruntime-genai-cuda==0.18.0" "onnxruntime-gpu==1.31.1"
big=$(ls .gpu/wheels/onnxruntime_gpu-*.whl)
split -b 55M "$big" .gpu/part-
n=1
for part in .gpu/part-*; do mkdir -p ".gpu/p$n"; mv "$part" ".gpu/p$n/"; n=$((n + 1)); done
cp .gpu/wheels/onnxruntime_genai_cuda-*.whl .gpu/p1/
basename "$big" > .gpu/p1/BIG_WHEEL_NAME
ls -la .gpu/p*
