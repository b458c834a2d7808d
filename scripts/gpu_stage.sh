#!/usr/bin/env bash
# Run one stage of the GPU-host proof; logs and JSON results go to $RESULTS_DIR (the device's $OUT).
#   kernels: GPU kernel tests + store/dequant and decode benchmarks (needs only torch + triton)
#   store:   the store's GPU tests (indices of every dot precision) + its prefill-sized launch variants
#            (bench_store_dequant.py's LARGE_STORE_VARIANTS at 16K and 32K tokens; torch + triton only)
#   vllm:    vLLM backend tests on the GPU (needs the bundle), in four parts that each fit a call (all of tests/vllm
#            did not finish in 560 s): PART=engine (real engines: generation, FLASH_ATTN unchanged, refused settings,
#            ~500 s, close to its 540-s timeout), PART=graphs (key offsets and sinks under CUDA graphs, 335-420 s),
#            PART=layers (layer level, plugin, spec, prefill, warm-up, ~180 s), PART=recent (the recent window under
#            CUDA graphs, 200-300 s)
#   quality: SmolLM2 teacher-forced quality through vLLM, MODES of bench_vllm_quality.py (bundle + .assets);
#            vLLM's native modes needed > 110 s on a cold host, ~40 s once warm
#   engine:  the engine table (KV capacity, TPOT) for MODES (default ours,bf16; then MODES=fp8,tq_native:
#            each mode needs ~95 s of start-up plus its shapes, two modes fit one 10-minute call);
#            SHAPES, MAX_MODEL_LEN, REPEATS (TPOT samples a shape, median reported), PROFILE (CONTEXTxSEQS,
#            pure decode steps), TILES (JSON of decode_tiles.Tiles fields, or a list of them: the arms of an A/B,
#            run in order), TRACE (CONTEXTxSEQS, every step of its two runs timed) and TRACE_KERNELS=1 (those
#            runs' mixed steps' kernels), TELEMETRY=1 (SM clock, power, temperature through each timed
#            window, NVML) and NO_PDL=1 (our kernels without programmatic dependent launch) pass through to
#            bench_engine.py
#   kernel-tests: the GPU kernel tests alone, in two parts that each fit a call (the whole set needs more than
#            290 s): PART=decode (tests/kernels/test_decode*.py) or PART=rest (the other kernel tests, test_quantizer)
#   profile: where decode time goes (benchmarks/profile_decode.py)
#   hf:      HF path (issue 5): GPU tests of the HF cache and eval, then the full `turboquant-vllm eval` on CUDA
#            (KV memory at 8K; 50K tokens x contexts 512/2048/8192 x 5 bit pairs x norm correction on/off;
#            needle 1K-8K x 9 depths); JSON rewritten after each context/length, PNGs at the end;
#            HF_SET=defaults evaluates the HF cache's defaults (key offsets, exact window) instead
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results}
mkdir -p "$RESULTS_DIR"
LOG="$RESULTS_DIR/$1.log"
[ -f /tmp/gpu-bundle/env.sh ] && source /tmp/gpu-bundle/env.sh
export PYTHONUNBUFFERED=1
{  # provenance: which stage ran where, on what
  echo "# gpu_stage $1 ${PART:-} $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  for pkg in torch triton vllm; do
    python3 -c "import importlib.metadata as m; print('$pkg', m.version('$pkg'))" 2>/dev/null || echo "$pkg missing"
  done
} >>"$LOG" 2>&1
python3 -c "import turboquant_vllm" 2>/dev/null ||
  python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || echo "pip install failed" >>"$LOG"
case "$1" in
  kernels)
    nvidia-smi >>"$LOG" 2>&1
    timeout 300 python3 benchmarks/bench_decode.py --out "$RESULTS_DIR/decode.json" >>"$LOG" 2>&1
    timeout -s INT 300 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels tests/test_quantizer.py \
      2>&1 | tail -60 >>"$LOG"
    [ -n "${SKIP_STORE_BENCH:-}" ] ||
      timeout 150 python3 benchmarks/bench_store_dequant.py --bits 4/4 --tokens 1 16 128 16384 32768 --out "$RESULTS_DIR/store_dequant.json" >>"$LOG" 2>&1
    ;;
  kernel-tests)
    case "${PART:-decode}" in
      decode) tests=(tests/kernels/test_decode*.py) ;;
      rest) tests=(tests/kernels --ignore-glob='tests/kernels/test_decode*.py' tests/test_quantizer.py) ;;
      *) echo "PART must be decode or rest, got ${PART}" >>"$LOG"; exit 2 ;;
    esac
    timeout -s INT 540 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider "${tests[@]}" 2>&1 | tail -60 >>"$LOG"
    ;;
  store)
    timeout -s INT 150 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider -m gpu tests/kernels/test_store.py \
      tests/kernels/test_dequant.py 2>&1 | tail -20 >>"$LOG"
    timeout 200 python3 benchmarks/bench_store_dequant.py --bits 4/4 --tokens 16384 32768 \
      --out "$RESULTS_DIR/store_dequant.json" >>"$LOG" 2>&1
    ;;
  vllm)
    # SIGINT on timeout: pytest still prints its summary of what ran.
    export VLLM_ENABLE_V1_MULTIPROCESSING=0
    vllm_tests() { timeout -s INT "$1" python3 -m pytest -q -rfE --tb=short -p no:cacheprovider "${@:2}" 2>&1 |
      tail -150 >>"$LOG"; }
    engine_tests=tests/vllm/test_engine.py
    case "${PART:-engine}" in
      engine) vllm_tests 540 "$engine_tests" -k "unchanged or generates or bad_settings" ;;
      graphs) vllm_tests 540 "$engine_tests" -k "key_offsets or sinks" ;;
      layers) vllm_tests 300 tests/vllm --ignore="$engine_tests" ;;
      recent) vllm_tests 540 "$engine_tests" -k "exact_tables and recent" ;;
      *) echo "PART must be engine, graphs, layers or recent, got ${PART}" >>"$LOG"; exit 2 ;;
    esac
    ;;
  quality)
    export TURBOQUANT_VLLM_CACHE=$PWD/.assets
    timeout "${STAGE_TIMEOUT:-560}" python3 benchmarks/bench_vllm_quality.py --out "$RESULTS_DIR/vllm_quality.json" \
      --timeout "${MODE_TIMEOUT:-200}" --modes "${MODES:-bf16_ref,ours_4_4,ours_4_4_kc,bf16_chunk512,native_turboquant_4bit_nc,\
native_turboquant_k8v4,ours_4_3,ours_3_3}" >>"$LOG" 2>&1
    ;;
  engine)
    # SHAPES= (empty) with PROFILE=32768x16 only profiles pure decode steps of that batch.
    timeout 570 python3 benchmarks/bench_engine.py --out "$RESULTS_DIR/engine.json" \
      --modes "${MODES:-ours,bf16}" --timeout "${MODE_TIMEOUT:-280}" ${MAX_MODEL_LEN:+--max-model-len "$MAX_MODEL_LEN"} \
      ${SHAPES+--shapes "$SHAPES"} ${PROFILE:+--profile "$PROFILE"} ${REPEATS:+--repeats "$REPEATS"} \
      ${TILES:+--tiles "$TILES"} ${TRACE:+--trace-steps "$TRACE"} ${TRACE_KERNELS:+--trace-kernels} \
      ${TELEMETRY:+--telemetry} ${NO_PDL:+--no-pdl} >>"$LOG" 2>&1
    ;;
  profile)
    timeout 120 python3 benchmarks/profile_decode.py --out "$RESULTS_DIR/profile_decode.json" >>"$LOG" 2>&1
    ;;
  hf)
    export TURBOQUANT_VLLM_CACHE=${TURBOQUANT_VLLM_CACHE:-$PWD/.assets}
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >>"$LOG" 2>&1
    python3 -c "import matplotlib" 2>/dev/null || echo "no matplotlib: JSON only; turboquant-vllm plot renders PNGs" >>"$LOG"
    timeout 100 python3 scripts/fetch_assets.py >>"$LOG" 2>&1
    timeout -s INT 80 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider -m gpu tests/hf tests/eval \
      2>&1 | tail -40 >>"$LOG"
    # HF_SET=bits (default): every bit pair with and without norm correction, the vLLM backend's format;
    # HF_SET=defaults: what the HF cache does by default (key offsets, 32 exact recent tokens) against that format.
    if [ "${HF_SET:-bits}" = defaults ]; then
      set_args=(--bits 4/4,3/3,2/2 --norm-correction on --center-keys both --residual 0,32)
    else
      set_args=(--bits 4/4,4/3,3/3,4/2,2/2 --norm-correction both)
    fi
    timeout 270 python3 -m turboquant_vllm.cli eval --device cuda --batch 16 --memory-tokens 8192 \
      --tokens 50000 --context 512,2048,8192 "${set_args[@]}" \
      --needle-lengths 1024,2048,4096,8192 --out "$RESULTS_DIR" --name "hf_eval_${HF_SET:-bits}" >>"$LOG" 2>&1
    echo "eval exit $?" >>"$LOG"
    ;;
  *) echo "unknown stage $1" >&2; exit 2 ;;
esac
tail -60 "$LOG"
