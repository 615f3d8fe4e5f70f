#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in phases that each fit one 10-minute device
# command. Uses the machine's own python3 (no registry there); writes logs and results to $OUT.
#     bash scripts/gpu_session.sh test       # build in place, full test suite on the GPU
#     bash scripts/gpu_session.sh sanitize   # compute-sanitizer memcheck + racecheck, both backends
#     bash scripts/gpu_session.sh bench      # pytest bench (layer, features, Table 1); if one command's
#                                            # 10 minutes are not enough, split it with BENCH_ARGS:
#                                            # "--suite layer", "--suite features", "--suite table1"
#                                            # (the SIMT CUDA backend is slow at M = 8192)
#     bash scripts/gpu_session.sh tune       # autotune tile configs for the bench shapes, vs the table
set -uo pipefail
OUT=${OUT:-/tmp/lora_kernels_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
case "${1:-test}" in
  test)
    python3 -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT/test.log" | tail -30 ;;
  sanitize)
    for tool in memcheck racecheck; do
      compute-sanitizer --tool "$tool" --print-limit 20 python3 scripts/sanitize_workload.py 2>&1 \
        | tee "$OUT/sanitize_$tool.log" | tail -8
    done ;;
  bench)
    python3 -m pytest bench -q -p no:cacheprovider --results-dir "$OUT" ${BENCH_ARGS:-} 2>&1 \
      | tee "$OUT/bench.log" | grep -v "^test_" | tail -120 ;;
  tune)
    LORA_KERNELS_AUTOTUNE=1 python3 scripts/tune_configs.py 2>&1 | tee "$OUT/tune.log" ;;
  *) echo "usage: $0 test|sanitize|bench|tune"; exit 2 ;;
esac
