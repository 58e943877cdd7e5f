#!/usr/bin/env bash
# Fuzzes normkit's C++ entry points with libFuzzer (tests/fuzz/fuzz_norms.cpp):
# installs clang and its fuzzer/sanitizer runtime when it can (root + apt-get),
# builds the target with ASan + UBSan in build/fuzz (a standalone CMake project
# over normkit's sources; the main build is untouched), seeds a corpus in
# build/fuzz/corpus (outside the repository; kept between runs), and fuzzes for
# a bounded time. Exits non-zero when the fuzzer finds a crash, a sanitizer
# report or a failed check, and prints the reproducer and how to replay it.
#
# Usage: bash scripts/fuzz.sh               (from anywhere)
#   FUZZ_SECONDS=90      how long to fuzz (libFuzzer -max_total_time)
#   FUZZ_SEED=1          libFuzzer -seed; the fixed default makes the test
#                        command's run repeatable on one machine (another CPU
#                        reaches other code, keeps other inputs and soon
#                        explores differently: a finding prints its input in
#                        base64, so a CI log replays anywhere); FUZZ_SEED=0
#                        picks a random seed for exploratory runs, e.g.
#                        FUZZ_SEED=0 FUZZ_SECONDS=1800
#   FUZZ_JOBS=1          parallel fuzzing processes (-fork); 1 keeps it to one core
#   FUZZ_BUILD=build/fuzz  build directory (the corpus is FUZZ_BUILD/corpus)
#   NORMKIT_FUZZ_STRICT=1  also fail on the known, already reported normkit bugs
#                          (see known_issue() in tests/fuzz/fuzz_norms.cpp)
#   JOBS                 build parallelism (default: nproc)
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZ_SECONDS=${FUZZ_SECONDS:-90}
FUZZ_JOBS=${FUZZ_JOBS:-1}
FUZZ_SEED=${FUZZ_SEED:-1}
FUZZ_BUILD=${FUZZ_BUILD:-build/fuzz}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}

step() { printf '\n==> %s\n' "$*"; }
skip() {
  echo
  echo "************************************************************************"
  echo "NOTE: fuzzing SKIPPED: $*"
  echo "      (needs clang with libFuzzer and the ASan/UBSan runtimes: on Debian,"
  echo "      'apt-get install clang libclang-rt-dev' as root)"
  echo "************************************************************************"
  exit 0
}

# --- clang and its fuzzer runtime -------------------------------------------------
CXX_FUZZ=${CXX_FUZZ:-}
find_clang() {
  if [ -n "$CXX_FUZZ" ]; then return 0; fi
  for c in clang++ clang++-19 clang++-18 clang++-17 clang++-16 clang++-15 clang++-14; do
    if command -v "$c" >/dev/null; then CXX_FUZZ=$c; return 0; fi
  done
  return 1
}
# True when the compiler can link a libFuzzer + ASan + UBSan program.
can_link_fuzzer() {
  local dir
  dir=$(mktemp -d)
  printf '%s\n' '#include <cstdint>' '#include <cstddef>' \
    'extern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }' > "$dir/t.cpp"
  "$CXX_FUZZ" -fsanitize=fuzzer,address,undefined "$dir/t.cpp" -o "$dir/t" >/dev/null 2>&1
  local rc=$?
  rm -rf "$dir"
  return $rc
}
if ! find_clang || ! can_link_fuzzer; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    step "installing clang and its fuzzer runtime from the system packages"
    # Another apt-get may hold the lock (wait for it rather than fail).
    apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@"; }
    apt_get update -qq || true
    # libclang-rt-dev: the libFuzzer / sanitizer runtimes (Debian 12+; older
    # releases ship them inside libclang-common-N-dev, which clang pulls in).
    apt_get install -y -qq clang libclang-rt-dev >/dev/null 2>&1 \
      || apt_get install -y -qq clang >/dev/null 2>&1 \
      || echo "NOTE: apt-get could not install clang"
    CXX_FUZZ=
  fi
  find_clang || skip "no clang++ found and it cannot be installed here"
  can_link_fuzzer || skip "$CXX_FUZZ cannot link -fsanitize=fuzzer,address,undefined (fuzzer runtime missing)"
fi
echo "compiler: $(command -v "$CXX_FUZZ") ($("$CXX_FUZZ" --version | head -n 1))"

# --- build -----------------------------------------------------------------------
step "building the fuzz target in $FUZZ_BUILD (clang, -fsanitize=fuzzer,address,undefined)"
cmake -S tests/fuzz -B "$FUZZ_BUILD" -DCMAKE_CXX_COMPILER="$CXX_FUZZ" >/dev/null
cmake --build "$FUZZ_BUILD" -j "$JOBS"
FUZZER="$FUZZ_BUILD/fuzz_norms"

# --- corpus (outside the repository) ------------------------------------------------
CORPUS="$FUZZ_BUILD/corpus"
ARTIFACTS="$FUZZ_BUILD/artifacts"   # this run's reproducers (cleared at each run)
rm -rf "$ARTIFACTS"
mkdir -p "$CORPUS" "$ARTIFACTS"
if [ -z "$(ls -A "$CORPUS")" ]; then
  # Seeds: for each norm kind (byte 0, 21 kinds) and dtype (byte 1), a few
  # inputs whose other bytes are deterministic pseudo-random choices.
  step "seeding $CORPUS"
  lcg=12345
  for kind in $(seq 0 20); do
    for dtype in 0 1 2 3; do
      for s in 0 1; do
        bytes=$(printf '\\%03o\\%03o' "$kind" "$dtype")
        for _ in $(seq 1 62); do
          lcg=$(( (lcg * 1103515245 + 12345) & 0x7fffffff ))
          bytes+=$(printf '\\%03o' $(( (lcg >> 16) & 255 )))
        done
        printf "$bytes" > "$CORPUS/seed-$kind-$dtype-$s"
      done
    done
  done
fi

# --- past findings: each input in tests/fuzz/regressions (one per bug fixed) must replay
# clean before the fuzzing starts, whatever this machine's fuzzing explores -------------
REGRESSIONS=tests/fuzz/regressions
if [ -n "$(ls -A "$REGRESSIONS" 2>/dev/null)" ]; then
  step "replaying the past findings in $REGRESSIONS ($(ls "$REGRESSIONS" | wc -l) inputs)"
  if ! ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1} \
       UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1} \
       "$FUZZER" "$REGRESSIONS"/* >"$FUZZ_BUILD/regressions.log" 2>&1; then
    echo "A PAST FINDING FAILS AGAIN:"
    grep -E -A 30 'normkit fuzz failure|ERROR: AddressSanitizer|runtime error|ERROR: libFuzzer|Running:' \
      "$FUZZ_BUILD/regressions.log" | tail -n 60
    echo "replay: NORMKIT_FUZZ_VERBOSE=1 $FUZZER $REGRESSIONS/NAME"
    exit 1
  fi
fi

# --- fuzz ------------------------------------------------------------------------
step "fuzzing for ${FUZZ_SECONDS}s, seed ${FUZZ_SEED} (corpus $CORPUS: $(ls "$CORPUS" | wc -l) inputs)"
LOG="$FUZZ_BUILD/fuzz.log"
args=(-max_total_time="$FUZZ_SECONDS" -max_len=512 -timeout=30 -rss_limit_mb=2048 -malloc_limit_mb=512
      -artifact_prefix="$ARTIFACTS/" -print_final_stats=1 -seed="$FUZZ_SEED")
[ "$FUZZ_JOBS" -gt 1 ] && args+=(-fork="$FUZZ_JOBS" -ignore_crashes=0)
set +e
ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1} \
UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1} \
  "$FUZZER" "${args[@]}" "$CORPUS" >"$LOG" 2>&1
rc=$?
set -e
grep -E '^(stat::|Done )' "$LOG" || tail -n 5 "$LOG"
if [ "$rc" -ne 0 ] || [ -n "$(ls -A "$ARTIFACTS")" ]; then
  echo
  echo "FUZZING FOUND A PROBLEM (exit code $rc). The report:"
  grep -E -A 30 'normkit fuzz failure|ERROR: AddressSanitizer|runtime error|ERROR: LeakSanitizer|ERROR: libFuzzer' "$LOG" \
    | head -n 80 || tail -n 40 "$LOG"
  for a in "$ARTIFACTS"/*; do
    [ -e "$a" ] || continue
    echo
    echo "reproducer: $a"
    echo "replay:     NORMKIT_FUZZ_VERBOSE=1 $FUZZER $a"
    echo "minimize:   $FUZZER -minimize_crash=1 -runs=20000 -exact_artifact_path=$a.min $a"
  done
  # The input itself, so that a log from another machine is enough to replay it.
  b64=$(grep -m1 '^Base64: ' "$LOG" | cut -d' ' -f2 || true)
  [ -n "$b64" ] && echo "from a log: echo $b64 | base64 -d > crash && NORMKIT_FUZZ_VERBOSE=1 $FUZZER crash"
  echo "full log:   $LOG"
  exit 1
fi
echo "fuzzing: no crash, sanitizer report or failed check in ${FUZZ_SECONDS}s"
