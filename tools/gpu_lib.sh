# Shell helpers of tools/gpu_check.sh and tools/gpu_record.sh (sourced). They expect RUNS (the folder the
# runs write into), TIMEOUT (seconds per run) and T0 (the start, in seconds since the epoch).

# run, not sourced (by sh too, which has no BASH_SOURCE: it said "Bad substitution"): say what to run
if [ -z "${BASH_VERSION:-}" ] || [ "${BASH_SOURCE[0]}" = "$0" ]; then
  echo "tools/gpu_lib.sh holds the helpers of tools/gpu_check.sh and tools/gpu_record.sh: run one of those" \
       "(--help says how)" >&2
  exit 2
fi

# A run still alive KILL_AFTER seconds after its timeout's SIGTERM is killed (train.py and the evaluators handle
# SIGTERM themselves, and a process waiting for a hung thread or worker never ends on it: the device machine's
# per-command limit would then stop the whole script). FAILED: "name (why)" of each run that failed.
KILL_AFTER=${KILL_AFTER:-30}
FAILED=()

# limited SECONDS CMD...: CMD under `timeout`, killed KILL_AFTER seconds after its SIGTERM (status 137)
limited() {
  local seconds=$1; shift
  timeout -k "$KILL_AFTER" "$seconds" "$@"
}

# note NAME STATUS: NAME added to FAILED unless STATUS is 0
note() {
  case "$2" in
    0) ;;
    124|137) FAILED+=("$1 (timed out)") ;;
    *) FAILED+=("$1 (exit $2)") ;;
  esac
}

# finish TABLE: the script's last lines; exit 3 when some run failed or timed out (named; the table shows them
# as "not run")
finish() {
  t "done: $1, .json, .log and gpu_${KIND}_runs.tgz"
  if [ ${#FAILED[@]} -gt 0 ]; then
    echo "failed runs: ${FAILED[*]}"
    exit 3
  fi
}

# value OPTION ARGS...: stops the script (exit 2) unless OPTION is followed by a value (not another option)
value() {
  [ $# -ge 2 ] && [ "${2#--}" = "$2" ] || { echo "error: $1 needs a value (see --help)" >&2; exit 2; }
}

# check_device: stops the script (exit 2) unless DEVICE is cuda or cpu (every run would refuse another)
check_device() {
  case "$DEVICE" in cuda|cpu) ;; *) echo "error: --device $DEVICE: expected cuda or cpu" >&2; exit 2 ;; esac
}

# start_log NAME: OUTDIR ($OUT, else /tmp) and RUNS made, unbuffered Python, and everything from here on
# printed and copied to OUTDIR/NAME.log; NAME gpu_check or gpu_record also names the table of ``snapshot``
start_log() {
  OUTDIR=${OUT:-/tmp} KIND=${1#gpu_}
  MADE_WORK=0 && [ -e "$(dirname "$RUNS")" ] || MADE_WORK=1  # (removed again when nothing could run)
  mkdir -p "$OUTDIR" "$RUNS"
  export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
  exec > >(tee "$OUTDIR/$1.log") 2>&1
}

# machine_env [--tests]: the wheels of WHEELS (--wheels DIR: packages the GPU machine lacks, carried there)
# installed without an index, then the machine and versions into RUNS/env.json; stops the script (exit 2) when
# requirements.txt (and with --tests, pytest) is not met, or --device cuda finds no CUDA GPU, since every run
# would fail
machine_env() {
  if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps "$WHEELS"/*.whl \
      || { echo "error: installing the wheels in $WHEELS failed" >&2; exit 2; }
  fi
  python3 tools/gpu_table.py env --device "$DEVICE" "$@" > "$RUNS/env.json"
  local rc=$?
  cat "$RUNS/env.json"
  if [ $rc != 0 ]; then  # nothing ran: the folders made for the runs go (the log in OUTDIR says why)
    rm -f "$RUNS/env.json"; rmdir "$RUNS" 2> /dev/null
    [ $MADE_WORK = 1 ] && rmdir "$(dirname "$RUNS")" 2> /dev/null
    exit 2
  fi
}

# t MESSAGE: the message with the seconds since the start
t() { echo "[t+$(( $(date +%s) - T0 ))s] $*"; }

# run NAME CMD...: CMD's output into RUNS/NAME/stdout.txt and, when it succeeds, its wall time (process start
# to exit) into RUNS/NAME/wall_s; RUNS/NAME is emptied first (train.py refuses a folder holding a run)
run() {
  local dir=$RUNS/$1; shift
  rm -rf "$dir"; mkdir -p "$dir"
  t "$(basename "$dir"): $*"
  local start end rc
  start=$(date +%s.%N)
  limited "$TIMEOUT" "$@" > "$dir/stdout.txt" 2>&1; rc=$?
  end=$(date +%s.%N)
  [ $rc = 0 ] && awk "BEGIN { printf \"%.2f\n\", $end - $start }" > "$dir/wall_s"
  note "$(basename "$dir")" $rc
  echo "  rc $rc"; tail -n 2 "$dir/stdout.txt" | cut -c1-300
  snapshot
}

# snapshot: the table of the runs so far (tools/gpu_table.py KIND, NOTE under its title) into OUTDIR/gpu_KIND.md /
# .json, and the runs' files under 3 MB (outputs, logs, metrics; no checkpoints) into OUTDIR/gpu_KIND_runs.tgz,
# after each run: a script stopped at a time limit (a GPU machine's per-command limit) leaves what it measured
snapshot() {
  python3 tools/gpu_table.py "$KIND" "$RUNS" --output "$OUTDIR/gpu_$KIND.md" --note "${NOTE:-}" ${QUICK_FLAG:-} > /dev/null 2>&1
  (cd "$RUNS" && find . -type f -size -3M -print0 | tar czf "$OUTDIR/gpu_${KIND}_runs.tgz" --null -T -) 2> /dev/null
}


# make_data DIR ARGS...: tools/make_benchmark_data.py into DIR, unless DIR already holds it with these ARGS
make_data() {
  local dir=$1; shift
  local stamp="$*"
  if [ "$(cat "$dir/made_with" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$dir"
    python3 tools/make_benchmark_data.py --output-dir "$dir" "$@" && echo "$stamp" > "$dir/made_with"
  fi
}
