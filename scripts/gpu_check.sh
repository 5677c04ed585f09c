#!/usr/bin/env bash
# The GPU check of gradsieve: one command, run from the repository root on a GPU machine.
#   1 build      the extension in place for this GPU (TORCH_CUDA_ARCH_LIST from the device, MAX_JOBS =
#                cores); skipped when the built library is newer than every source and has CUDA kernels
#   2 pytest     the whole suite, the CUDA tests (CPU/CUDA parity) included; JUnit XML
#   3 sanitizer  compute-sanitizer memcheck, racecheck, synccheck and initcheck over
#                scripts/cuda_op_driver.py (every op on small and odd sizes, checked against plain torch)
#   4 bench      benchmarks/bench_ops.py --device cuda --sizes 26,28 against its CUDA targets
#   5 hook       benchmarks/bench_hook.py --device cuda: the DDP hooks on a ResNet-50 backward pass
# and then a summary (stage status, test counts, the benchmark tables) as the last lines.
#
# Each stage logs to its own file in $OUT (default ./gpu_check_out), eight files at most:
#   build.log pytest.log pytest.xml sanitizer.log bench_ops.log bench_ops.json bench_hook.log
#   bench_hook.json
# A failed stage does not stop the next one; the exit status is 1 when any stage failed or ran out of
# time. Without a GPU, or with GPU_CHECK_DRY_RUN=1, it is a dry run: the build command is checked
# (setup.py is evaluated, nothing is compiled), the test suite is collected, and the drivers of
# stages 3 to 5 run in their CPU modes while the stages report "skipped: needs CUDA"; a dry run whose
# CPU checks pass exits 0. tests/test_gpu_check.py runs the dry run in CI.
#
# Usage: bash scripts/gpu_check.sh [STAGE ...]     (default: build pytest sanitizer bench hook)
# Environment:
#   PYTHON                 interpreter with torch (default: .venv/bin/python if present, else python3)
#   OUT                    output folder (default ./gpu_check_out)
#   GPU_CHECK_DRY_RUN=1    dry run even on a GPU machine
#   GPU_CHECK_DEADLINE_S   seconds for the whole run (default 1200); each stage gets at most its own
#                          limit and at most what is left, and is skipped when under 20 s are left
#   GPU_CHECK_REBUILD=1    build even when the library is up to date
#   GPU_CHECK_SANITIZERS   tools of stage 3 (default "memcheck racecheck synccheck initcheck")
#   GPU_CHECK_DRIVER_ARGS  extra arguments of cuda_op_driver.py under the sanitizers (for example
#                          "--ops topk_abs,ef_topk_" when the whole driver does not fit the time)
#   GPU_CHECK_PYTEST_ARGS  extra pytest arguments (for example "-n 8" with pytest-xdist, or "-x")
#   GPU_CHECK_PYTEST_K     one pytest -k expression (for example "cuda" or "not cuda")
#   GPU_CHECK_PYTEST_M     one pytest -m expression (for example "not slow": the slow tier holds no
#                          CUDA test, only CPU multi-process and command-line runs, which CI runs)
#   GPU_CHECK_PYTEST_LIMIT seconds for the pytest stage (default 360)
# One call of the device tool may run 10 minutes. On an H100 (2026-11-24) the build took 35 s, the
# CUDA tests 50 s, the sanitizers about 150 s, the benchmarks 180 s and the hook 35 s, while the CPU
# tests need more than one call. So: first everything with the CUDA tests, then the CPU tests:
#   GPU_CHECK_DEADLINE_S=570 GPU_CHECK_PYTEST_K=cuda bash scripts/gpu_check.sh
#   GPU_CHECK_DEADLINE_S=590 GPU_CHECK_PYTEST_LIMIT=540 GPU_CHECK_PYTEST_K="not cuda" \
#     GPU_CHECK_PYTEST_M="not slow" bash scripts/gpu_check.sh build pytest
# (a machine is given back 30 s after a call, so the second call builds again).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

ALL_STAGES=(build pytest sanitizer bench hook)
declare -A LIMIT=([build]=300 [pytest]=${GPU_CHECK_PYTEST_LIMIT:-360} [sanitizer]=240 [bench]=180 [hook]=120)
declare -A STATUS NOTE USED GIVEN
DEADLINE=${GPU_CHECK_DEADLINE_S:-1200}
RESERVE=15  # seconds kept for the summary
SANITIZERS=${GPU_CHECK_SANITIZERS:-memcheck racecheck synccheck initcheck}

for stage in "$@"; do
  if [ -z "${LIMIT[$stage]+x}" ]; then
    echo "usage: bash scripts/gpu_check.sh [STAGE ...], stages: ${ALL_STAGES[*]} (got '$stage')" >&2
    exit 2
  fi
done
STAGES=()  # the stages asked for (all by default), in the order above: the build comes first
for stage in "${ALL_STAGES[@]}"; do
  if [ "$#" = 0 ] || [[ " $* " == *" $stage "* ]]; then STAGES+=("$stage"); fi
done

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi
OUT=${OUT:-./gpu_check_out}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build
export PYTHONUNBUFFERED=1
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

# ------------------------------------------------------------------------------------ helpers
say() { echo "gpu_check: $*"; }

# The time limit of a stage: its own, or what is left before the deadline if that is less.
limit_of() {
  local left=$((DEADLINE - SECONDS - RESERVE)) want=${LIMIT[$1]}
  if [ "$left" -lt "$want" ]; then want=$left; fi
  echo "$want"
}

# finish STAGE STATUS NOTE: records a stage's result and prints it.
finish() {
  STATUS[$1]=$2
  NOTE[$1]=$3
  USED[$1]=$((SECONDS - STAGE_START))
  if [ "$2" = skipped ]; then say "$1: skipped: $3"; else say "$1: $2: $3"; fi
}

# The last lines of a log, on failure, so that the reply shows why.
show_tail() {
  echo "---- last lines of $(basename "$1") ----"
  tail -n "${2:-25}" "$1"
  echo "----"
}

# run_limited SECONDS LOG CMD...: runs CMD with its output appended to LOG, stopped with SIGINT at
# the limit (pytest still writes its report then) and killed 20 s later; returns CMD's status, 124
# when it ran out of time.
run_limited() {
  local seconds=$1 log=$2
  shift 2
  timeout -s INT -k 20 "$seconds" "$@" >> "$log" 2>&1
}

py() { "$PY" "$@"; }

# conclude STAGE RC LOG TAIL_LINES WHAT LIMIT DRY_NOTE PASS_NOTE: the verdict of a stage that ran a
# driver (WHAT) under run_limited: timed out, failed (with the log's tail), skipped in a dry run
# (the driver's CPU mode passed), or passed.
conclude() {
  local stage=$1 rc=$2 log=$3 lines=$4 what=$5 limit=$6 dry_note=$7 pass_note=$8
  if [ "$rc" != 0 ]; then
    show_tail "$log" "$lines"
    if [ "$rc" = 124 ]; then finish "$stage" timed-out "${what%% *} ran past $limit s"
    else finish "$stage" failed "$what exited $rc (see $(basename "$log"))"; fi
  elif [ "$DRY" = 1 ]; then
    finish "$stage" skipped "needs CUDA ($DRY_REASON); $dry_note"
  else
    finish "$stage" passed "$pass_note"
  fi
}

# ------------------------------------------------------------------------------------ the machine
if ! MACHINE=$(py - 2> "$SCRATCH/probe.err" <<'EOF'
import torch
gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
cap = "%d.%d" % torch.cuda.get_device_capability(0) if gpu else ""
name = torch.cuda.get_device_name(0) if gpu else "none"
print(f"{int(gpu)}\n{cap}\n{name}\n{torch.__version__}\n{torch.version.cuda}")
EOF
); then
  say "the interpreter '$PY' cannot import torch:"
  tail -n 5 "$SCRATCH/probe.err"
  say "set PYTHON to an interpreter with torch"
  exit 1
fi
{ read -r HAS_GPU; read -r CAPABILITY; read -r GPU_NAME; read -r TORCH_VERSION; read -r TORCH_CUDA; } <<< "$MACHINE"
DRY=0
DRY_REASON=""
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then DRY=1; DRY_REASON="GPU_CHECK_DRY_RUN=1"
elif [ "$HAS_GPU" != 1 ]; then
  # A GPU that the driver lists but torch cannot use is a failure, not a reason for a dry run.
  if command -v nvidia-smi > /dev/null && nvidia-smi -L 2> /dev/null | grep -q '^GPU'; then
    say "nvidia-smi lists a GPU but torch $TORCH_VERSION (CUDA $TORCH_CUDA) cannot use it:"
    nvidia-smi -L
    tail -n 5 "$SCRATCH/probe.err"
    say "stages: 0 passed, ${#STAGES[@]} failed, 0 skipped of ${#STAGES[@]} (no usable GPU); exit 1"
    exit 1
  fi
  DRY=1
  DRY_REASON="no GPU"
fi
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys those two
JOBS=${MAX_JOBS:-$CORES}
ARCH=${TORCH_CUDA_ARCH_LIST:-$CAPABILITY}

if [ "$DRY" = 1 ]; then
  MODE="dry run: $DRY_REASON"
  # The CPU modes run small problems on a machine that may be busy: idle threads would only spin.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  # A dry run forced on a GPU machine behaves as on a machine without one: torch's own PowerSGD
  # hook, for one, calls torch.cuda.synchronize on CPU buckets whenever CUDA is available.
  export CUDA_VISIBLE_DEVICES=""
else
  MODE="GPU run on $GPU_NAME (sm $CAPABILITY)"
fi
say "$MODE; python $PY, torch $TORCH_VERSION (CUDA ${TORCH_CUDA}), $CORES cores, OUT=$OUT"
limits=""
for stage in "${STAGES[@]}"; do limits+="$stage ${LIMIT[$stage]} s, "; done
say "stages: ${STAGES[*]}; limits: ${limits%, }; whole run at most $DEADLINE s"

# Each stage writes only its own files; remove those of the stages run now (a reused OUT).
declare -A FILES=([build]="build.log" [pytest]="pytest.log pytest.xml" [sanitizer]="sanitizer.log"
                  [bench]="bench_ops.log bench_ops.json" [hook]="bench_hook.log bench_hook.json")
for stage in "${STAGES[@]}"; do
  for f in ${FILES[$stage]}; do rm -f "${OUT:?}/$f"; done
done

# ------------------------------------------------------------------------------------ 1 build
built_library() { find python/gradsieve -maxdepth 1 -name '_C*.so' 2>/dev/null | head -n 1; }

stage_build() {
  local log=$OUT/build.log limit=$1
  {
    echo "python: $PY ($(py --version 2>&1)), torch $TORCH_VERSION, torch CUDA $TORCH_CUDA"
    echo "nvcc: $(command -v nvcc >/dev/null && nvcc --version | tail -n 1 || echo 'not on PATH')"
    echo "ninja: $(command -v ninja >/dev/null && ninja --version || echo 'not on PATH')"
    echo "GPU: $GPU_NAME, capability $CAPABILITY; TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$JOBS"
  } > "$log"
  if [ "$DRY" = 1 ]; then
    # setup.py is evaluated (sources globbed, the CUDA decision taken) without compiling anything.
    if TORCH_CUDA_ARCH_LIST=${ARCH:-8.0;9.0} MAX_JOBS=$JOBS run_limited "$limit" "$log" "$PY" setup.py --name; then
      local plan
      plan=$(grep -m 1 '^gradsieve: building' "$log" | sed 's/^gradsieve: //')
      finish build passed "dry run: setup.py evaluates (it would be: ${plan:-?}); nothing built"
    else
      show_tail "$log"
      finish build failed "dry run: 'setup.py --name' failed (see build.log)"
    fi
    return
  fi
  local lib
  lib=$(built_library)
  if [ "${GPU_CHECK_REBUILD:-0}" != 1 ] && [ -n "$lib" ] \
      && [ -z "$(find csrc setup.py -newer "$lib" -type f | head -n 1)" ] \
      && py -c "import gradsieve, sys; sys.exit(0 if gradsieve.cuda_kernels_built() else 1)" >> "$log" 2>&1; then
    finish build passed "up to date with CUDA kernels ($lib), not rebuilt"
    return
  fi
  echo "== $PY setup.py build_ext --inplace" >> "$log"
  local t0=$SECONDS rc
  TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$JOBS run_limited "$limit" "$log" "$PY" setup.py build_ext --inplace
  rc=$?
  local took=$((SECONDS - t0))
  say "build took $took s (TORCH_CUDA_ARCH_LIST=$ARCH, MAX_JOBS=$JOBS)"
  if [ "$rc" = 124 ]; then
    show_tail "$log"
    finish build timed-out "the build ran past $limit s"
  elif [ "$rc" != 0 ]; then
    grep -n -m 10 -E 'error|Error' "$log"
    show_tail "$log"
    finish build failed "setup.py build_ext exited $rc after $took s (see build.log)"
  elif ! py -c "import gradsieve, sys; sys.exit(0 if gradsieve.cuda_kernels_built() else 1)" >> "$log" 2>&1; then
    grep -m 1 '^gradsieve: building' "$log"
    show_tail "$log" 10
    finish build failed "built in $took s, but gradsieve has no CUDA kernels or does not import"
  else
    finish build passed "built in $took s for sm $ARCH with $JOBS jobs"
  fi
}

# ------------------------------------------------------------------------------------ 2 pytest
# Counts of a JUnit XML file: "tests failures errors skipped cuda_skips".
junit_counts() {
  py - "$1" <<'EOF'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
# tests/conftest.py's requires_cuda: these must not skip on a GPU machine
cuda_skips = sum(1 for s in root.iter("skipped") if "needs a GPU and a CUDA build" in (s.get("message") or ""))
print(total["tests"], total["failures"], total["errors"], total["skipped"], cuda_skips)
EOF
}

stage_pytest() {
  local log=$OUT/pytest.log xml=$OUT/pytest.xml limit=$1 rc
  if [ "$DRY" = 1 ]; then
    run_limited "$limit" "$log" "$PY" -m pytest --collect-only -qq -p no:cacheprovider
    rc=$?
    local collected
    collected=$(awk -F': ' '/^tests\/.*: [0-9]+$/ {n += $2; f += 1} END {print n " tests in " f " files"}' "$log")
    if [ "$rc" = 0 ]; then
      finish pytest passed "dry run: collected $collected, none run (the GPU run runs them all)"
    else
      show_tail "$log"
      finish pytest failed "dry run: collecting the suite failed (pytest exit $rc, see pytest.log)"
    fi
    return
  fi
  local args=(-q -rfE --durations=15 -p no:cacheprovider "--junitxml=$xml")
  if py -c "import pytest_timeout" 2> /dev/null; then args+=(--timeout=240); fi
  # shellcheck disable=SC2206  # GPU_CHECK_PYTEST_ARGS is a word list on purpose
  args+=(${GPU_CHECK_PYTEST_ARGS:-})
  if [ -n "${GPU_CHECK_PYTEST_K:-}" ]; then args+=(-k "$GPU_CHECK_PYTEST_K"); fi
  if [ -n "${GPU_CHECK_PYTEST_M:-}" ]; then args+=(-m "$GPU_CHECK_PYTEST_M"); fi
  echo "== $PY -m pytest ${args[*]}" > "$log"
  run_limited "$limit" "$log" "$PY" -m pytest "${args[@]}"
  rc=$?
  local counts=""
  [ -s "$xml" ] && counts=$(junit_counts "$xml" 2>> "$log")
  if [ -n "$counts" ]; then
    local tests failures errors skipped cuda_skips
    read -r tests failures errors skipped cuda_skips <<< "$counts"
    PYTEST_COUNTS="tests: $((tests - failures - errors - skipped)) passed, $failures failed, $errors errors, $skipped skipped of $tests (pytest.xml)"
  else
    PYTEST_COUNTS="tests: no JUnit XML was written (see pytest.log)"
  fi
  tail -n 3 "$log"
  if [ "$rc" = 124 ]; then
    finish pytest timed-out "stopped at $limit s; $PYTEST_COUNTS"
  elif [ "$rc" != 0 ]; then
    grep -E '^(FAILED|ERROR) ' "$log" | head -n 20
    finish pytest failed "pytest exit $rc; $PYTEST_COUNTS"
  elif [ "${cuda_skips:-0}" != 0 ]; then
    finish pytest failed "$cuda_skips CUDA tests skipped although a GPU is present; $PYTEST_COUNTS"
  else
    finish pytest passed "$PYTEST_COUNTS"
  fi
}

# ------------------------------------------------------------------------------------ 3 sanitizer
find_sanitizer() {
  local candidate
  for candidate in "$(command -v compute-sanitizer)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
      /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then echo "$candidate"; return 0; fi
  done
  return 1
}

stage_sanitizer() {
  local log=$OUT/sanitizer.log limit=$1 rc
  if [ "$DRY" = 1 ]; then
    echo "== dry run ($DRY_REASON): $PY scripts/cuda_op_driver.py --device cpu (no sanitizer)" > "$log"
    echo "compute-sanitizer: $(find_sanitizer || echo 'not found')" >> "$log"
    run_limited "$limit" "$log" "$PY" scripts/cuda_op_driver.py --device cpu
    rc=$?
    local verdict
    verdict=$(grep -m 1 '^cuda_op_driver: [0-9]* passed' "$log" | sed 's/^cuda_op_driver: //')
    if [ "$rc" = 0 ]; then
      finish sanitizer skipped "needs CUDA ($DRY_REASON); the CPU mode of cuda_op_driver.py passed (${verdict:-?})"
    else
      show_tail "$log"
      finish sanitizer failed "dry run: cuda_op_driver.py --device cpu exited $rc (${verdict:-see sanitizer.log})"
    fi
    return
  fi
  local sanitizer
  if ! sanitizer=$(find_sanitizer); then
    echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda)" > "$log"
    finish sanitizer failed "compute-sanitizer not found"
    return
  fi
  : > "$log"
  local tools=() tool results="" failed=0 end=$((SECONDS + limit)) weights=0
  read -r -a tools <<< "$SANITIZERS"
  # Each tool gets a share of the time still left to the stage, by weight: on the H100
  # (2026-11-24) memcheck over every size took about 45 s, racecheck over the small sizes about
  # 80 s, synccheck and initcheck about 10 s each.
  tool_weight() { case $1 in memcheck) echo 2 ;; racecheck) echo 4 ;; *) echo 1 ;; esac; }
  for tool in "${tools[@]}"; do weights=$((weights + $(tool_weight "$tool"))); done
  for tool in "${tools[@]}"; do
    # memcheck runs every size (65537 and 2^20 + 3 too); the other tools run the small sizes.
    local size=--small weight
    weight=$(tool_weight "$tool")
    [ "$tool" = memcheck ] && size=""
    local share=$(( (end - SECONDS) * weight / weights ))
    weights=$((weights - weight))
    # shellcheck disable=SC2206  # $size and GPU_CHECK_DRIVER_ARGS are word lists on purpose
    local driver=(scripts/cuda_op_driver.py --device cuda $size ${GPU_CHECK_DRIVER_ARGS:-})
    echo "== $tool (limit $share s): $sanitizer --tool $tool $PY ${driver[*]}" >> "$log"
    if [ "$share" -lt 10 ]; then
      results+="$tool out of time; "
      failed=1
      continue
    fi
    local mark
    mark=$(wc -l < "$log")
    # Without torch's caching allocator every tensor is its own allocation, so memcheck sees an
    # access past a tensor's end instead of landing in a neighbour of the same cached block.
    # API errors are left to the driver (gradsieve's launchers raise on them): torch's own start-up
    # probes some calls that fail harmlessly.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_limited "$share" "$log" "$sanitizer" --tool "$tool" \
      --error-exitcode 97 --print-limit 20 --report-api-errors no "$PY" "${driver[@]}"
    rc=$?
    local errors
    errors=$(tail -n +"$((mark + 1))" "$log" | grep -oE 'ERROR SUMMARY: [0-9]+ error' | tail -n 1 | grep -oE '[0-9]+')
    case "$rc" in
      0) results+="$tool clean; " ;;
      97) results+="$tool ${errors:-some} errors; "; failed=1 ;;
      124) results+="$tool ran past $share s; "; failed=1 ;;
      1) results+="$tool: the driver found a mismatch; "; failed=1 ;;
      *) results+="$tool exit $rc; "; failed=1 ;;
    esac
  done
  results=${results%; }
  if [ "$failed" = 0 ]; then
    finish sanitizer passed "$results"
  else
    grep -E 'FAIL|=========.*(Invalid|Race|Barrier|Uninitialized|hazard|error)' "$log" | head -n 15
    show_tail "$log" 15
    finish sanitizer failed "$results"
  fi
}

# ------------------------------------------------------------------------------------ 4 bench
stage_bench() {
  local log=$OUT/bench_ops.log limit=$1 rc args
  if [ "$DRY" = 1 ]; then
    args=(--device cpu --sizes 12 --repeats 2)
  else
    local sizes=26,28  # the sizes of the targets
    args=(--device cuda --sizes "$sizes")
  fi
  echo "== $PY benchmarks/bench_ops.py ${args[*]}" > "$log"
  run_limited "$limit" "$log" "$PY" benchmarks/bench_ops.py "${args[@]}" --out "$SCRATCH/bench"
  rc=$?
  # The CSV holds the same rows as the JSON; only the JSON comes back (eight files at most).
  [ -s "$SCRATCH/bench/bench_ops.json" ] && cp "$SCRATCH/bench/bench_ops.json" "$OUT/bench_ops.json"
  local met
  met=$(grep -m 1 '^targets (CUDA' "$log")
  conclude bench "$rc" "$log" 25 "bench_ops.py ${args[*]}" "$limit" \
    "bench_ops.py ran on CPU at n = 2^12" "n = 2^26 and 2^28; ${met:-no target rows}"
}

# ------------------------------------------------------------------------------------ 5 hook
stage_hook() {
  local log=$OUT/bench_hook.log limit=$1 rc args
  if [ "$DRY" = 1 ]; then args=(--device cpu --quick); else args=(--device cuda); fi
  echo "== $PY benchmarks/bench_hook.py ${args[*]}" > "$log"
  run_limited "$limit" "$log" "$PY" benchmarks/bench_hook.py "${args[@]}" --out "$OUT"
  rc=$?
  conclude hook "$rc" "$log" 15 "bench_hook.py ${args[*]}" "$limit" \
    "bench_hook.py --quick ran on CPU (gloo)" "ResNet-50 gradient, NCCL world size 1"
}

# ------------------------------------------------------------------------------------ run
PYTEST_COUNTS=""
number=0
for stage in "${STAGES[@]}"; do
  number=$((number + 1))
  STAGE_START=$SECONDS
  limit=$(limit_of "$stage")
  if [ "$limit" -lt 20 ]; then
    USED[$stage]=0
    GIVEN[$stage]=0
    STATUS[$stage]=timed-out
    NOTE[$stage]="not started: $((DEADLINE - SECONDS)) s were left of GPU_CHECK_DEADLINE_S=$DEADLINE (summary: $RESERVE s)"
    say "$stage: ${NOTE[$stage]}"
    continue
  fi
  GIVEN[$stage]=$limit
  echo
  say "== [$number/${#STAGES[@]}] $stage (limit $limit s) =="
  case $stage in
    build) stage_build "$limit" ;;
    pytest) stage_pytest "$limit" ;;
    sanitizer) stage_sanitizer "$limit" ;;
    bench) stage_bench "$limit" ;;
    hook) stage_hook "$limit" ;;
  esac
done

# ------------------------------------------------------------------------------------ summary
echo
say "== summary: $MODE, torch $TORCH_VERSION, $SECONDS s =="
if [ -n "${STATUS[bench]+x}" ] && [ -s "$OUT/bench_ops.json" ]; then
  py benchmarks/bench_ops.py --table-from "$OUT/bench_ops.json" 2>&1 | tail -n 60
  echo
fi
if [ -n "${STATUS[hook]+x}" ] && [ -s "$OUT/bench_hook.json" ]; then
  py benchmarks/bench_hook.py --table-from "$OUT/bench_hook.json" 2>&1 | tail -n 20
  echo
fi
[ -n "$PYTEST_COUNTS" ] && say "$PYTEST_COUNTS"
printf '%-10s %-9s %7s %6s  %s\n' stage status seconds limit note
passed=0 failed=0 skipped=0
for stage in "${STAGES[@]}"; do
  printf '%-10s %-9s %7s %6s  %s\n' "$stage" "${STATUS[$stage]}" "${USED[$stage]}" "${GIVEN[$stage]}" "${NOTE[$stage]}"
  case "${STATUS[$stage]}" in
    passed) passed=$((passed + 1)) ;;
    skipped) skipped=$((skipped + 1)) ;;
    *) failed=$((failed + 1)) ;;
  esac
done
files=$(cd "$OUT" && find . -type f | sed 's|^\./||' | sort | tr '\n' ' ')
say "files in $OUT: ${files:-none}"
code=0
[ "$failed" -gt 0 ] && code=1
say "stages: $passed passed, $failed failed, $skipped skipped of ${#STAGES[@]} ($MODE); exit $code"
exit "$code"
