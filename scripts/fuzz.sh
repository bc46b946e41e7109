#!/usr/bin/env bash
# The sanitized fuzz campaign: build every extension with AddressSanitizer and UBSan in
# a copy of the tree (the normal in-place build is left alone), then run each harness of
# tests/fuzz for N seconds under the sanitizers. Prints cases run per harness and whether
# it crashed or tripped a sanitizer; exits non-zero on any finding.
#
#   scripts/fuzz.sh [-t SECONDS] [-e auto|atheris|random] [-j JOBS] [HARNESS...]
#
#   -t  seconds per harness (default 60; FUZZ_SECONDS)      -j  harnesses run at once (1)
#   -e  engine: random (default with sanitizers), atheris, auto (default with -n: atheris
#       if installed). Under a preloaded ASan runtime atheris loses its coverage counters
#       (libasan provides the symbols), so the sanitized campaign uses our outcome-guided
#       mutator; -n gives atheris its coverage for a plain, coverage-guided campaign.
#   -n  no sanitizers (plain build)
# Environment: PYTHON (default .venv/bin/python, else python3), FUZZ_DIR (the sanitized
# copy, default build/fuzz-asan), FUZZ_OUT (logs, corpora, crashes; default build/fuzz-out).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECONDS_PER=${FUZZ_SECONDS:-60}
ENGINE=
JOBS=1
SANITIZE=address,undefined
while getopts "t:e:j:n" opt; do
    case $opt in
        t) SECONDS_PER=$OPTARG ;;
        e) ENGINE=$OPTARG ;;
        j) JOBS=$OPTARG ;;
        n) SANITIZE= ;;
        *) sed -n '2,17p' "$0"; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ -n "$ENGINE" ] || { if [ -n "$SANITIZE" ]; then ENGINE=random; else ENGINE=auto; fi; }
HARNESSES=("$@")
[ ${#HARNESSES[@]} -eq 0 ] && HARNESSES=(esp tso vxlan vring)
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
DIR=${FUZZ_DIR:-$ROOT/build/fuzz-asan}
OUT=${FUZZ_OUT:-$ROOT/build/fuzz-out}
[ -n "$SANITIZE" ] || DIR=${FUZZ_DIR:-$ROOT/build/fuzz-plain}
mkdir -p "$DIR" "$OUT"

# 1. The copy: sources only (no .so, no generated .c), then an in-place build there.
stamp="$DIR/.build-stamp"
tar -C "$ROOT" --exclude=./build --exclude=./.git --exclude=./.venv --exclude='*.so' \
    --exclude='./softnic/*.c' --exclude='./vhost/*.c' --exclude='__pycache__' \
    --exclude=./.hypothesis -cf - softnic vhost tests setup.py pyproject.toml \
    | tar -C "$DIR" -xf -
(cd "$ROOT" && cat setup.py softnic/*.pyx softnic/*.pxd softnic/csrc/* vhost/*.pyx vhost/*.pxd \
    2>/dev/null; echo "$SANITIZE") | sha1sum > "$stamp.new"
if ! cmp -s "$stamp" "$stamp.new" || ! ls "$DIR"/softnic/_esp*.so >/dev/null 2>&1; then
    echo "building the extensions with -fsanitize=${SANITIZE:-none} in $DIR"
    (cd "$DIR" && rm -rf build softnic/*.so vhost/*.so &&
     SOFTNIC_SANITIZE=$SANITIZE "$PYTHON" setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1) \
        || { echo "sanitized build failed; see $OUT/build.log" >&2; tail -20 "$OUT/build.log" >&2; exit 3; }
    mv "$stamp.new" "$stamp"
fi

# 2. The sanitizer runtimes must come first in a Python that was not built with them.
ENV=()
if [ -n "$SANITIZE" ]; then
    libs=""
    for lib in libasan.so libubsan.so; do
        p=$(gcc -print-file-name=$lib)
        [ -e "$p" ] || { echo "$lib not found (gcc -print-file-name)" >&2; exit 3; }
        libs="${libs:+$libs:}$(readlink -f "$p")"
    done
    # CPython's own allocations are not ours to report: no leak check. The guest-memory
    # guard (vhost/_virtq.pyx) installs its SIGBUS/SIGSEGV handler in front of ASan's and
    # hands it every fault that is not on guest memory: ASan must let it (the default of
    # recent runtimes, said explicitly here).
    ENV=(LD_PRELOAD="$libs"
         ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:handle_segv=1:handle_sigbus=1:allow_user_segv_handler=1:handle_abort=1:detect_stack_use_after_return=0:allocator_may_return_null=1"
         UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:report_error_type=1")
fi

# 3. Prove the chain works before trusting a quiet run: every extension links the
#    sanitizer runtime, and an overflow (through an intercepted memmove) is reported.
if [ -n "$SANITIZE" ]; then
    for so in "$DIR"/softnic/*.so "$DIR"/vhost/*.so; do
        grep -q libasan <<<"$(ldd "$so")" || { echo "$so is not instrumented" >&2; exit 3; }
    done
    canary=$(cd "$DIR" && env "${ENV[@]}" "$PYTHON" -c 'import ctypes
libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p
ctypes.memmove(ctypes.create_string_buffer(64), libc.malloc(16), 32)' 2>&1 || true)
    grep -q "ERROR: AddressSanitizer: heap-buffer-overflow" <<<"$canary" \
        || { echo "AddressSanitizer is not active (canary overflow not reported)" >&2; exit 3; }
fi

# 4. The harnesses, each in its own process under the time budget.
run_one() {
    local h=$1 log="$OUT/$1.log"
    rm -f "$OUT/$h.json"
    (cd "$DIR" && env "${ENV[@]}" PYTHONPATH="$DIR" PYTHONHASHSEED=0 \
        timeout --kill-after=10 $((SECONDS_PER * 2 + 120)) \
        "$PYTHON" tests/fuzz/run.py "$h" --seconds "$SECONDS_PER" --engine "$ENGINE" \
        --corpus "$OUT/corpus-$h" --crash-dir "$OUT/crashes" --json "$OUT/$h.json") \
        >"$log" 2>&1
    echo $? >"$OUT/$h.rc"
}
echo "fuzzing ${HARNESSES[*]} for ${SECONDS_PER}s each (sanitizers: ${SANITIZE:-none}, engine: $ENGINE)"
running=0
for h in "${HARNESSES[@]}"; do
    run_one "$h" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then wait -n || true; running=$((running - 1)); fi
done
wait || true

# 5. The verdict.
status=0
printf '%-7s %-8s %10s %8s %9s  %s\n' harness engine cases seconds outcomes result
for h in "${HARNESSES[@]}"; do
    log="$OUT/$h.log"
    rc=$(cat "$OUT/$h.rc" 2>/dev/null || echo 99)
    line=$(grep -E '^\{"harness"' "$log" | tail -1 || true)
    read -r eng cases secs outc < <("$PYTHON" -c 'import json,sys
d=json.loads(sys.argv[1]) if sys.argv[1] else {}
print(d.get("engine","-"), d.get("cases",0), d.get("seconds",0), d.get("outcomes",0))' "$line")
    result=ok
    if grep -qE 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer|SUMMARY: (Address|UndefinedBehavior)Sanitizer' "$log"; then
        result="SANITIZER REPORT"
    elif grep -q '^FINDING' "$log"; then
        result="FINDING (contract broken)"
    elif [ "$rc" != 0 ] || [ -z "$line" ]; then
        result="CRASH (exit $rc)"
    fi
    [ "$result" = ok ] || status=1
    printf '%-7s %-8s %10s %8s %9s  %s\n' "$h" "$eng" "$cases" "$secs" "$outc" "$result"
    [ "$result" = ok ] || { echo "--- $log (last 40 lines)"; tail -40 "$log"; }
done
echo "logs, corpora and crash inputs: $OUT"
exit $status
