#!/usr/bin/env bash
# A consumer of the installed normkit CMake package that asks for something
# the build lacks must get a clear CMake error, not a vague "not found".
#
#   bash tests/cmake/check_consumer_errors.sh <normkit install prefix>
#
# Configures tiny consumer projects (in a temporary directory) with
# find_package(normkit CONFIG ... COMPONENTS ...) against the prefix:
#   - REQUIRED COMPONENTS cuda      -> fails, naming the component, the reason
#                                      (built without CUDA) and what is available
#   - REQUIRED COMPONENTS bogus     -> fails, calling the component unknown
#   - REQUIRED COMPONENTS cpu       -> configures (a component every build has)
#   - OPTIONAL_COMPONENTS cuda      -> configures, normkit_cuda_FOUND false
# Exits non-zero (and prints CMake's output) when any of these does not hold.
set -euo pipefail

if [ $# -ne 1 ] || [ ! -d "$1" ]; then
  echo "usage: $0 <normkit install prefix>" >&2
  exit 2
fi
prefix=$(cd "$1" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/normkit-consumer.XXXXXX")
trap 'rm -rf "$work"' EXIT
failures=0

# configure NAME FIND_PACKAGE_ARGS [EXTRA_CMAKE_CODE]: writes and configures a
# consumer project; its output is in $work/NAME.log, its status in $status.
configure() {
  local name=$1 args=$2 extra=${3:-}
  mkdir -p "$work/$name"
  cat >"$work/$name/CMakeLists.txt" <<EOF
cmake_minimum_required(VERSION 3.18)
project(normkit_consumer_$name LANGUAGES CXX)
find_package(normkit CONFIG $args)
$extra
EOF
  set +e
  cmake -S "$work/$name" -B "$work/$name/build" -DCMAKE_PREFIX_PATH="$prefix" >"$work/$name.log" 2>&1
  status=$?
  set -e
}

fail() {
  echo "FAIL: $1"
  sed 's/^/    | /' "$work/$2.log"
  failures=$((failures + 1))
}

# CMake wraps long messages; compare on whitespace-collapsed text.
flat() { tr -s ' \n\t' ' ' <"$work/$1.log"; }

expect_error() {  # NAME ARGS WANTED_TEXT...
  local name=$1 args=$2
  shift 2
  configure "$name" "$args"
  if [ "$status" -eq 0 ]; then
    fail "find_package(normkit CONFIG $args) configured; expected an error" "$name"
    return
  fi
  local text
  text=$(flat "$name")
  for want in "$@"; do
    if [[ "$text" != *"$want"* ]]; then
      fail "find_package(normkit CONFIG $args): the error does not say: $want" "$name"
      return
    fi
  done
  echo "ok: find_package(normkit CONFIG $args) fails with: $want"
}

expect_error cuda "REQUIRED COMPONENTS cuda" \
  "normkit: component 'cuda' is not available in this build (built without CUDA); available: cpu"
expect_error unknown "REQUIRED COMPONENTS cpu bogus" \
  "normkit: component 'bogus' is unknown; available: cpu"

configure cpu "REQUIRED COMPONENTS cpu" \
  'if(NOT TARGET normkit::normkit)
  message(FATAL_ERROR "normkit::normkit missing")
endif()'
if [ "$status" -ne 0 ]; then fail "find_package(normkit CONFIG REQUIRED COMPONENTS cpu) failed" cpu
else echo "ok: find_package(normkit CONFIG REQUIRED COMPONENTS cpu) configures"; fi

configure optional "REQUIRED OPTIONAL_COMPONENTS cuda" \
  'if(normkit_cuda_FOUND OR NOT normkit_FOUND)
  message(FATAL_ERROR "expected normkit found without its cuda component")
endif()'
if [ "$status" -ne 0 ]; then fail "find_package(normkit CONFIG REQUIRED OPTIONAL_COMPONENTS cuda) failed" optional
else echo "ok: find_package(normkit CONFIG REQUIRED OPTIONAL_COMPONENTS cuda) configures, normkit_cuda_FOUND false"; fi

if [ "$failures" -ne 0 ]; then
  echo "check_consumer_errors: $failures check(s) FAILED"
  exit 1
fi
echo "check_consumer_errors: all checks passed"
