#!/usr/bin/env bash
# What a session with a lent GPU runs, in phases that each fit one 10-minute device command. Uses
# the machine's own python3 (no registry there), builds in place, and packs logs and results into
# $OUT/results.tgz after every step, so a step cut by its time box keeps what finished.
#
# Timings from the first H100 session (2026-11-22, triton 3.6): build 25 s; the whole test suite
# > 330 s (Triton JIT, the SIMT CUDA backend at large shapes, 500 hypothesis cases); layer suite
# ~40 s per shape at r = 16; Table 1 fp16 ~115 s; each device command also pays ~1 min of start.
# A 30-minute session fits three commands:
#     bash scripts/gpu_session.sh test       # all tests (time-boxed, no -x) + memcheck + racecheck
#     bash scripts/gpu_session.sh bench      # layer suite (r = 16, 64; ~100 s per shape), features
#     bash scripts/gpu_session.sh table1     # Table 1 in fp16 and fp32 (TABLE1_DTYPES)
# and, for kernel work:
#     bash scripts/gpu_session.sh sweep      # tile-config sweep vs cuBLAS (scripts/sweep_tiles.py)
#     bash scripts/gpu_session.sh profile    # host time per eager call (scripts/profile_launch.py)
#     bash scripts/gpu_session.sh cuda       # the CUDA backend: its tests, memcheck + racecheck of its
#                                            # kernels, and scripts/bench_cuda_kernels.py (per-kernel times)
#     bash scripts/gpu_session.sh mixed      # mixed precision (issue 19): its tests (fp32 adapters on every
#                                            # backend incl. CUDA, autocast, Trainer bf16/fp16) and the layer
#                                            # suite's pure-bf16 vs "+fp32 adapters" rows (~6 min in all)
#     bash scripts/gpu_session.sh wgmma      # quick turnaround on the sm_90a wgmma kernels: their GPU tests
#                                            # (failures summed up per LORA_KERNELS_WGMMA_LOADS mode) and a
#                                            # short bench (WGMMA_BENCH_ARGS)
#     bash scripts/gpu_session.sh launch     # eager overhead (issue 24): the Triton and graph tests with
#                                            # LORA_KERNELS_DIRECT_LAUNCH=1, host stages, eager layer cells
#                                            # at M = 1..32 with the switch off and on, generate() tok/s (≤ 8 min)
#     bash scripts/gpu_session.sh tma        # the large-M TMA kernel, forward and dX (issue 23): its GPU tests against float64,
#                                            # memcheck of the Triton kernels with it on, the layer at M = 1024, 8192,
#                                            # 32768 on four shapes against cuBLAS, Unsloth- and PEFT-style, pointer
#                                            # kernels vs TMA, and fused dropout's cost with TMA on (≤ 8 min)
# Time boxes and arguments can be changed by environment: TEST_S, TEST_ARGS, LAYER_S, RANKS,
# REPS, FEATURES_S, TABLE1_S, TABLE1_DTYPES, TRIALS, CUDA_BENCH_S, CUDA_BENCH_ARGS, WGMMA_BENCH_ARGS.
set -uo pipefail
OUT=${OUT:-/tmp/lora_kernels_out}
R=/tmp/lora_kernels_results
mkdir -p "$OUT" "$R"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
pack() { tar -czf "$OUT/results.tgz" -C "$R" . ; }
box() { local seconds=$1; shift; timeout -k 5 -s INT "$seconds" "$@"; }  # SIGINT: pytest still reports
bench() { local name=$1 seconds=$2; shift 2
  box "$seconds" python3 -m pytest bench -q -p no:cacheprovider --results-dir "$R/$name" "$@" > "$R/bench-$name.log" 2>&1
  grep -E "^\|" "$R/bench-$name.log" | cut -c1-200 | tail -${TAIL:-24}; pack; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} | tee "$R/gpu.txt"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
case "${1:-test}" in
  test)
    box "${TEST_S:-400}" python3 -m pytest ${TEST_ARGS:-tests} -q -p no:cacheprovider -rfE --tb=short --timeout 120 \
      --deselect tests/triton/test_gpu_compile.py > "$R/test.log" 2>&1
    grep -E "^(FAILED|ERROR)|^E  |passed|failed" "$R/test.log" | cut -c1-200 | head -40; pack
    for tool in memcheck racecheck; do
      box 60 compute-sanitizer --tool "$tool" --print-limit 20 python3 scripts/sanitize_workload.py \
        > "$R/sanitize_$tool.log" 2>&1; tail -2 "$R/sanitize_$tool.log"; pack
    done ;;
  bench)
    for shape in 4096x4096 4096x11008 11008x4096; do
      TAIL=40 bench "layer-$shape" "${LAYER_S:-110}" --suite layer --shapes "$shape" --ranks "${RANKS:-16,64}" \
        --reps "${REPS:-30}"
    done
    bench features "${FEATURES_S:-60}" --suite features ;;
  table1)
    bench table1 "${TABLE1_S:-500}" --suite table1 --table1-dtypes "${TABLE1_DTYPES:-fp16,fp32}" --trials "${TRIALS:-100}" ;;
  sweep)
    box "${SWEEP_S:-400}" python3 scripts/sweep_tiles.py > "$R/sweep.log" 2>&1; tail -32 "$R/sweep.log"; pack ;;
  profile)
    box 120 python3 scripts/profile_launch.py > "$R/profile.log" 2>&1; head -60 "$R/profile.log" | cut -c1-160; pack ;;
  cuda)
    box "${TEST_S:-200}" python3 -m pytest tests/test_cuda_extension.py tests/test_compile.py tests/test_function.py tests/test_multi.py \
      -q -p no:cacheprovider -rfE --tb=short -k "cuda or extension" > "$R/cuda-test.log" 2>&1
    grep -E "^(FAILED|ERROR)|^E  |passed|failed" "$R/cuda-test.log" | cut -c1-200 | head -40; pack
    for tool in memcheck racecheck; do
      LORA_SANITIZE_BACKENDS=cuda box 90 compute-sanitizer --tool "$tool" --print-limit 20 python3 \
        scripts/sanitize_workload.py > "$R/cuda-sanitize_$tool.log" 2>&1; tail -2 "$R/cuda-sanitize_$tool.log"; pack
    done
    box "${CUDA_BENCH_S:-240}" python3 scripts/bench_cuda_kernels.py ${CUDA_BENCH_ARGS:-} > "$R/cuda-bench.log" 2>&1
    cut -c1-200 "$R/cuda-bench.log" | head -90; pack ;;
  mixed)
    box "${TEST_S:-200}" python3 -m pytest tests/test_mixed_precision.py tests/test_peft_compat.py \
      tests/test_distributed.py -q -p no:cacheprovider -rfE --tb=short > "$R/mixed-test.log" 2>&1
    grep -E "^(FAILED|ERROR)|^E  |passed|failed" "$R/mixed-test.log" | cut -c1-200 | head -40; pack
    TAIL=40 bench mixed "${LAYER_S:-150}" --suite layer --shapes 4096x4096,4096x11008 --ranks 16 --m 1,16,1024,8192 \
      --reps "${REPS:-30}" --impls "base,peft,peft +fp32 adapters,lora_kernels[auto],lora_kernels[auto] +fp32 adapters" ;;
  wgmma)
    box "${TEST_S:-200}" python3 -m pytest tests/test_cuda_extension.py -q -p no:cacheprovider -rfE --tb=line \
      -k "wgmma" > "$R/wgmma-test.log" 2>&1
    grep -E "passed|failed" "$R/wgmma-test.log" | tail -1
    for loads in producer tma cp.async; do  # which mode fails says which layer to suspect
      echo "$loads: $(grep -c "^FAILED.*\[$loads-" "$R/wgmma-test.log") failed"
    done
    grep -E "^(FAILED|ERROR)" "$R/wgmma-test.log" | cut -c1-200 | head -12; pack
    box "${CUDA_BENCH_S:-200}" python3 scripts/bench_cuda_kernels.py ${WGMMA_BENCH_ARGS:---shapes 4096x4096 --rows 16,1024,8192} \
      > "$R/wgmma-bench.log" 2>&1
    cut -c1-220 "$R/wgmma-bench.log" | head -40; pack ;;
  launch)  # issue 24's cells; the time boxes add up to 8 minutes with the install (expected: ~6)
    LORA_KERNELS_DIRECT_LAUNCH=1 box "${TEST_S:-110}" python3 -m pytest tests/triton/test_triton_kernels.py \
      tests/triton/test_launch.py tests/test_function.py tests/test_compile.py tests/test_memory_determinism.py \
      -q -p no:cacheprovider -rfE --tb=short -k "triton or launch or graph" > "$R/launch-test.log" 2>&1
    grep -E "^(FAILED|ERROR)|^E  |passed|failed" "$R/launch-test.log" | cut -c1-200 | head -30; pack
    bench host 30 --suite host
    for direct in 0 1; do
      LORA_KERNELS_DIRECT_LAUNCH=$direct TAIL=30 bench "eager-direct$direct" "${LAYER_S:-60}" --suite layer \
        --shapes 4096x4096 --ranks 16 --m 1,8,16,32 --reps "${REPS:-50}" \
        --impls "base,peft,lora_kernels[triton],lora_kernels[cuda],lora_kernels[auto]"
      LORA_KERNELS_DIRECT_LAUNCH=$direct box 30 python3 scripts/profile_launch.py > "$R/profile-direct$direct.log" 2>&1
      head -12 "$R/profile-direct$direct.log" | cut -c1-160
      LORA_KERNELS_DIRECT_LAUNCH=$direct box 60 python3 scripts/eager_generate.py --json "$R/generate-direct$direct.json" \
        2>&1 | grep -v "^\[transformers\]" | tee "$R/generate-direct$direct.log" | tail -5; pack
    done ;;
  tma)  # issue 23's cells: its three shapes and a held-out one (5120x13824, LLaMA-13B's MLP), M = 1024, 8192,
        # 32768, r = 16 then 64, against cuBLAS, Unsloth- and PEFT-style; then fused dropout's cost with the TMA
        # kernel on. The time boxes add up to 8 minutes with the install.
    box "${TEST_S:-100}" python3 -m pytest tests/triton/test_triton_kernels.py -q -p no:cacheprovider -rfE --tb=short \
      -k "tma" > "$R/tma-test.log" 2>&1
    grep -E "^(FAILED|ERROR)|^E  |passed|failed" "$R/tma-test.log" | cut -c1-200 | head -30; pack
    LORA_KERNELS_TMA_ROWS=1 LORA_SANITIZE_BACKENDS=triton box 50 compute-sanitizer --tool memcheck \
      --print-limit 20 python3 scripts/sanitize_workload.py > "$R/tma-memcheck.log" 2>&1; tail -2 "$R/tma-memcheck.log"; pack
    for shape in ${SHAPES:-4096x4096 4096x11008 11008x4096 5120x13824}; do
      TAIL=40 bench "tma-$shape" "${LAYER_S:-65}" --suite layer --shapes "$shape" --ranks "${RANKS:-16,64}" \
        --m "${MS:-1024,8192,32768}" --reps "${REPS:-20}" --dtype bf16 \
        --impls "base,unsloth-style,peft-style,lora_kernels[triton],lora_kernels[triton] +tma,lora_kernels[auto]"
    done
    # the training step with p = 0.1 against p = 0 (and PEFT-style nn.Dropout), forward and dX on the TMA kernel
    LORA_KERNELS_TMA_ROWS=1024 bench tma-dropout "${FEATURES_S:-45}" --suite features -k dropout --shapes 4096x4096 \
      --ranks 16 --m 8192 --dtype bf16 ;;
  *) echo "usage: $0 test|bench|table1|sweep|profile|cuda|mixed|wgmma|launch|tma"; exit 2 ;;
esac
