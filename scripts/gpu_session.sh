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
#     bash scripts/gpu_session.sh smoke      # first look in one command: tests (time-boxed, no -x),
#                                            # memcheck, and a small layer bench
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
  smoke)
    timeout -k 5 330 python3 -m pytest tests -q -p no:cacheprovider --timeout 120 -rfE \
      --deselect tests/triton/test_gpu_compile.py 2>&1 | tee "$OUT/test.log" | tail -40
    timeout -k 5 80 compute-sanitizer --tool memcheck --print-limit 20 python3 scripts/sanitize_workload.py 2>&1 \
      | tee "$OUT/sanitize_memcheck.log" | tail -12
    timeout -k 5 100 python3 -m pytest bench -q -p no:cacheprovider --results-dir "$OUT" --suite layer \
      --shapes 4096x4096 --m 1,16,1024,8192 --ranks 16 --reps 30 2>&1 | tee "$OUT/bench.log" | grep -v "^test_" | tail -40 ;;
  triage)  # failing tests with tracebacks, racecheck, launch profile, tile sweep
    timeout -k 5 -s INT ${TEST_S:-200} python3 -m pytest ${TEST_ARGS:-tests} -q -p no:cacheprovider -rfE --tb=short \
      --timeout 100 --deselect tests/triton/test_gpu_compile.py > "$OUT/test.log" 2>&1
    grep -E "^(FAILED|ERROR)|^E  |passed|failed" "$OUT/test.log" | cut -c1-220 | head -60
    timeout -k 5 ${RACE_S:-80} compute-sanitizer --tool racecheck --print-limit 20 python3 scripts/sanitize_workload.py \
      > "$OUT/sanitize_racecheck.log" 2>&1; tail -3 "$OUT/sanitize_racecheck.log"
    timeout -k 5 60 python3 scripts/profile_launch.py > "$OUT/profile.log" 2>&1; head -60 "$OUT/profile.log" | cut -c1-160
    timeout -k 5 ${SWEEP_S:-200} python3 scripts/sweep_tiles.py 2>&1 | tee "$OUT/sweep.log" | grep -v "^skip" | tail -35 ;;
  final)  # GPU-only tests, then the benchmark in time-boxed pieces (one device command); results
          # and logs in $OUT/results.tgz, refreshed after every piece so a timeout keeps what finished
    R=/tmp/lk_results; mkdir -p $R; pack() { tar -czf "$OUT/results.tgz" -C $R . ; }
    timeout -k 5 -s INT ${TEST_S:-100} python3 -m pytest ${TEST_ARGS:-tests} -q -p no:cacheprovider -rfE --tb=short \
      --timeout 60 --deselect tests/triton/test_gpu_compile.py > $R/test.log 2>&1
    grep -E "^(FAILED|ERROR)|^E  |passed|failed" $R/test.log | cut -c1-200 | head -30; pack
    for shape in 4096x4096 4096x11008 11008x4096; do
      timeout -k 5 -s INT ${LAYER_S:-100} python3 -m pytest bench -q -p no:cacheprovider --results-dir $R/layer-$shape \
        --suite layer --shapes $shape --ranks 16 --reps 30 > $R/bench-layer-$shape.log 2>&1
      grep -E "^\| .*(×|base)" $R/bench-layer-$shape.log | grep -E "base |auto|triton|unsloth" | cut -c1-200 | tail -20; pack
    done
    timeout -k 5 -s INT ${TABLE1_S:-90} python3 -m pytest bench -q -p no:cacheprovider --results-dir $R/table1 \
      --suite table1 --table1-dtypes fp16 --trials 100 > $R/bench-table1.log 2>&1
    grep -E "^\|" $R/bench-table1.log | cut -c1-200 | tail -24; pack
    timeout -k 5 -s INT ${FEATURES_S:-30} python3 -m pytest bench -q -p no:cacheprovider --results-dir $R/features \
      --suite features --m 1024 > $R/bench-features.log 2>&1
    grep -E "^\|" $R/bench-features.log | cut -c1-200 | tail -12; pack ;;
  tune)
    LORA_KERNELS_AUTOTUNE=1 python3 scripts/tune_configs.py 2>&1 | tee "$OUT/tune.log" ;;
  *) echo "usage: $0 test|sanitize|bench|tune"; exit 2 ;;
esac
