#!/usr/bin/env bash
# On the GPU machine (Python 3.12, torch + transformers + onnx preinstalled, no registry). Steps:
#   1. for each .gpu/pN carried in (one `run` call each):  bash benchmarks/gpu/run_on_gpu.sh stash N
#   2. then:                                               bash benchmarks/gpu/run_on_gpu.sh install
#   3. then:                                               bash benchmarks/gpu/run_on_gpu.sh build     (full, CUDA)
#   4. then:                                               bash benchmarks/gpu/run_on_gpu.sh bench     (writes to $OUT)
# Untested end to end: no GPU was lent to the session that wrote it.
set -euo pipefail
cd "$(dirname "$0")/../.."
SITE=/tmp/site
export PYTHONPATH="$SITE:$PWD/runtime:${PYTHONPATH:-}"
case "${1:-}" in
  stash)
    mkdir -p /tmp/parts && cp ".gpu/p$2"/* /tmp/parts/ && ls -la /tmp/parts ;;
  install)
    big=$(cat /tmp/parts/BIG_WHEEL_NAME)
    cat /tmp/parts/part-* > "/tmp/$big"
    pip install --no-deps --target "$SITE" "/tmp/$big" /tmp/parts/onnxruntime_genai_cuda-*.whl
    python -c "import onnxruntime as o; o.preload_dlls(); import onnxruntime_genai as og; print(o.__file__, o.get_available_providers(), og.__file__)" ;;
  build)
    python scripts/make_synthetic_model.py --preset full --provider cuda --out /tmp/models/full-int4-cuda ;;
  bench)
    out="${OUT:-/tmp/out}/bench-gpu-full"
    python -m phi3v_ort bench \
        --model-dir /tmp/models/full-int4-cuda --device cuda --engines ort,torch --torch-dtype bf16 \
        --torch-attn eager,sdpa --reps 5 --warmup 1 --max-new-tokens 128 --out "$out"
    python -m phi3v_ort bench \
        --model-dir /tmp/models/full-int4-cuda --device cuda --engines ort --cuda-graph \
        --scenarios chart,text --reps 5 --max-new-tokens 128 --out "$out-cuda-graph" ;;
  *)
    echo "usage: $0 stash N | install | build | bench" >&2; exit 2 ;;
esac
