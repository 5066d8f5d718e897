#!/bin/bash
# GPU check: the test suite with CUDA present, then every row of the GPU table (docs/performance.md, "Measured on GPUs")
# measured on synthetic photo-sized JPEGs (tools/make_benchmark_data.py): the training step alone; train.py end
# to end (PIL, --cache-images --amp, --gpu-decode --amp) against it; evaluation end to end against loading alone
# and against the forward alone; evaluator.py as users run it. Prints ONE markdown table (card, versions, date;
# measured value, ratio, target, met) and writes it to $OUT (or /tmp) as gpu_check.md / .json, with the log and
# the runs' small files (gpu_check_runs.tgz), both also after each run: a check stopped early leaves its rows.
# About 8 minutes on one H100 / H200 with 16 cores (the suite at most 4). Run from anywhere:
#
#   tools/gpu_check.sh                       # one GPU
#   tools/gpu_check.sh --device cpu --quick  # tiny sizes on the CPU: the same runs and table, in a few minutes
#
# Options: --device cuda|cpu, --quick (tiny model, images and batches; no test suite), --tests (after --quick:
# the suite too), --no-tests,
# --work DIR (data and runs; default /tmp/gpu_check), --timeout S (each run; default 180, --quick 300),
# --suite-timeout S (default 240), --wheels DIR (wheels installed first, without an index: what the machine lacks
# or has too old; the check stops at once when requirements.txt, or pytest for the suite, is not met). Each run
# is limited by `timeout` (killed 30 s after it, KILL_AFTER); a run that fails or times out shows as "not run" in the table, is named in
# the last line, and makes the exit status 3 (1: no row measured; 2: nothing could run). The data is made while
# the suite runs (both use only the CPU).
set -u
source "$(dirname "$0")/gpu_lib.sh"
DEVICE=cuda QUICK=0 TESTS=1 WORK=/tmp/gpu_check RUN_TIMEOUT="" SUITE_TIMEOUT=240 WHEELS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) value "$@"; DEVICE=$2; shift 2 ;;
    --quick) QUICK=1; TESTS=0; shift ;;
    --tests) TESTS=1; shift ;;
    --no-tests) TESTS=0; shift ;;
    --work) value "$@"; WORK=$2; shift 2 ;;
    --wheels) value "$@"; WHEELS=$2; shift 2 ;;
    --timeout) value "$@"; RUN_TIMEOUT=$2; shift 2 ;;
    --suite-timeout) value "$@"; SUITE_TIMEOUT=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
check_device
cd "$(dirname "$0")/.." || exit 2
RUNS=$WORK/runs DATA=$WORK/data
start_log gpu_check

if [ $QUICK = 1 ]; then
  ARCH=deit_sat_nano_patch16_224 IMG=64 RESIZE=72 TRAIN_N=32 TEST_N=16 CLASSES=4 MIN_PX=80 MAX_PX=120
  BS=8 EVAL_BS=8 TENCROP_BS=4 STEPS=2 WARMUP=1 WORKERS=2 TIMEOUT=300
else
  ARCH=deit_sat_small_patch16_224 IMG=224 RESIZE=256 TRAIN_N=4000 TEST_N=4000 CLASSES=200 MIN_PX=300 MAX_PX=500
  BS=256 EVAL_BS=256 TENCROP_BS=64 STEPS=6 WARMUP=2 WORKERS=14 TIMEOUT=180
fi
[ -n "$RUN_TIMEOUT" ] && TIMEOUT=$RUN_TIMEOUT
NOTE="DeiT-S SAT at 224 px"
[ $QUICK = 1 ] && NOTE="--quick: nano SAT at $IMG px, not comparable with the targets"
NOTE="$NOTE; $TRAIN_N train + $TEST_N test synthetic JPEGs of $MIN_PX-$MAX_PX px, $CLASSES classes; train.py:"
NOTE="$NOTE CUB.yaml, 2 epochs, random init, batch $BS, $WORKERS workers. Targets: one H100-class GPU, 16 cores."

T0=$(date +%s)
QUICK_FLAG="" && [ $QUICK = 1 ] && QUICK_FLAG=--quick
# bench NAME ARGS...: tools/benchmark.py's JSON line into RUNS/NAME.json
bench() {
  local name=$1; shift
  t "$name: benchmark.py $*"
  limited "$TIMEOUT" python3 tools/benchmark.py --device "$DEVICE" --arch "$ARCH" --img-size $IMG \
      --resize-size $RESIZE --num-classes $CLASSES --steps $STEPS --warmup $WARMUP "$@" \
      > "$RUNS/$name.json" 2> "$RUNS/$name.err"
  local rc=$?
  note "$name" $rc
  echo "  rc $rc"; tail -c 400 "$RUNS/$name.json"; echo
  [ $rc = 0 ] || tail -n 2 "$RUNS/$name.err" | cut -c1-300
  snapshot
}

t "## machine"
if [ $TESTS = 1 ]; then machine_env --tests; else machine_env; fi
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

t "## data (in the background while the suite runs)"
make_data "$DATA" --train $TRAIN_N --test $TEST_N --num-classes $CLASSES --min-size $MIN_PX --max-size $MAX_PX &
DATA_PID=$!

if [ $TESTS = 1 ]; then
  t "## test suite"
  XDIST="" && python3 -c "import xdist" 2>/dev/null && XDIST="-n 16"
  echo "pytest ${XDIST:-(no pytest-xdist: one process)}"
  # -v: one line per test as it ends, so that a suite stopped at its limit still names its failures. With
  # pytest-xdist one torch thread per test process (and the processes they start): 16 processes of 16 threads
  # each on 16 cores would spend the suite's time switching threads. The files with CUDA-only tests, or with
  # process groups started beside CUDA, go first: a suite stopped at its limit has run them.
  FILES=(tests/test_device.py tests/test_device_transforms.py tests/test_gpu_decode.py tests/test_data_loader.py
         tests/test_evaluation_ddp.py tests/test_area_loss_scope.py)
  for f in tests/test_*.py; do [[ " ${FILES[*]} " == *" $f "* ]] || FILES+=("$f"); done
  limited "$SUITE_TIMEOUT" env ${XDIST:+OMP_NUM_THREADS=1} python3 -m pytest -v -p no:cacheprovider --durations=10 \
      $XDIST "${FILES[@]}" > "$RUNS/pytest.txt" 2>&1
  note "test suite" $?
  grep -E "^(FAILED|ERROR) |^=+ .*[0-9]+ (passed|failed)|^[0-9.]+s (call|setup)" "$RUNS/pytest.txt" | tail -25 | cut -c1-300
  snapshot
else
  rm -f "$RUNS/pytest.txt"
fi
# table: the final table; the last line and the exit status name the runs that failed
table() {
  t "## table"
  python3 tools/gpu_table.py check "$RUNS" --output "$OUTDIR/gpu_check.md" --note "$NOTE" $QUICK_FLAG --final || exit 1
  finish "$OUTDIR/gpu_check.md"
}
DATA_OK=1
wait $DATA_PID || { DATA_OK=0; note "benchmark data" 1; echo "error: tools/make_benchmark_data.py failed" >&2; }

t "## the training step alone, the evaluation forward alone (no data)"
bench step_fp32 --mode train --batch-size $BS --no-amp
bench step_bf16 --mode train --batch-size $BS --amp
bench eval_memory --mode eval --batch-size $EVAL_BS
[ $DATA_OK = 1 ] || table  # the runs on the data are skipped (exit 3)

t "## train.py end to end (epoch 2 of 2)"
train() {
  local name=$1; shift
  run "$name" python3 train.py --config config/CUB.yaml --data-root "$DATA" --pretrained false --epochs 2 \
      --arch "$ARCH" --img-size $IMG --resize-size $RESIZE --batch-size $BS --eval-batch-size $EVAL_BS \
      --workers $WORKERS --device "$DEVICE" --no-tencrop --output-dir "$RUNS/$name" "$@"
}
train train_pil_fp32
train train_cache_bf16 --cache-images --amp
train train_gpu_decode_bf16 --gpu-decode --amp

t "## evaluation: end to end against loading alone / the forward alone"
bench eval_centre --mode eval --data-root "$DATA" --workers $WORKERS --batch-size $EVAL_BS
bench eval_gpu_decode --mode eval --data-root "$DATA" --workers $WORKERS --batch-size $EVAL_BS --gpu-decode
bench eval_tencrop --mode eval --data-root "$DATA" --workers $WORKERS --batch-size $TENCROP_BS --tencrop

t "## evaluator.py as users run it (the checkpoint of train_pil_fp32)"
CKPT=$RUNS/train_pil_fp32/checkpoints/best.pth
evaluator() {
  local name=$1 batch=$2; shift 2
  run "$name" python3 evaluator.py --data-root "$DATA" --checkpoint "$CKPT" --workers $WORKERS --device "$DEVICE" \
      --eval-batch-size $batch --output-dir "$RUNS/$name" "$@"
}
evaluator evaluator_centre $EVAL_BS --no-tencrop
evaluator evaluator_gpu_decode $EVAL_BS --no-tencrop --gpu-decode
evaluator evaluator_tencrop $TENCROP_BS --tencrop

table
