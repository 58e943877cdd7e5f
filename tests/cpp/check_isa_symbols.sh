#!/usr/bin/env bash
# check_isa_symbols.sh - no AVX code outside the AVX kernel namespaces.
#
# The per-ISA ODR trap: the same inline function (or template instance) is
# compiled in the baseline and in an AVX translation unit; the linker keeps
# one copy, maybe the AVX one, and the baseline path then runs AVX code (an
# illegal instruction on an old CPU) or the AVX path runs the scalar copy.
# normkit avoids it by keeping every ISA's code in its own namespace. This
# script proves it on the built binary: it disassembles the files given
# (static archive, shared library, object or executable; not stripped) and
# fails if any function whose own name is NOT in one of the allowed
# namespaces contains an AVX instruction: a ymm/zmm register, an AVX-512
# mask (k) instruction, or any VEX/EVEX-encoded (v-prefixed) instruction,
# which catches AVX code on xmm registers too (vfmadd..., vcvtph2ps, vmovss).
#
# usage: check_isa_symbols.sh [--expect-avx] FILE...
#   --expect-avx   also fail if no AVX code is found at all in the allowed
#                  namespaces (the AVX kernels were built, so finding none
#                  means the check cannot see them and proves nothing).
# environment:
#   OBJDUMP                      objdump to use (default: objdump)
#   NORMKIT_ISA_ALLOWED          space-separated namespace prefixes allowed to
#                                hold AVX code (default: the two below)
set -euo pipefail

objdump=${OBJDUMP:-objdump}
allowed=${NORMKIT_ISA_ALLOWED-"normkit::kernels::avx2:: normkit::kernels::avx512:: normkit::kernels::avx512_bf16::"}
expect_avx=0
files=()
for arg in "$@"; do
  case "$arg" in
    --expect-avx) expect_avx=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    -*) echo "check_isa_symbols: unknown option $arg" >&2; exit 2 ;;
    *) files+=("$arg") ;;
  esac
done
if [ ${#files[@]} -eq 0 ]; then
  echo "usage: check_isa_symbols.sh [--expect-avx] FILE..." >&2
  exit 2
fi

status=0
for file in "${files[@]}"; do
  if [ ! -f "$file" ]; then
    echo "check_isa_symbols: $file: no such file" >&2
    exit 2
  fi
  listing=$(mktemp)
  trap 'rm -f "$listing"' EXIT
  if ! "$objdump" -d -C --no-show-raw-insn "$file" >"$listing" 2>"$listing.err"; then
    echo "check_isa_symbols: $objdump failed on $file:" >&2
    cat "$listing.err" >&2
    rm -f "$listing.err"
    exit 2
  fi
  rm -f "$listing.err"

  awk -v allowed="$allowed" -v expect_avx="$expect_avx" -v file="$file" '
    # The namespace-qualified name of a demangled function, without return
    # type, template arguments, parameters or clone suffixes:
    #   "void normkit::kernels::avx2::(anonymous namespace)::f<float>(float const*) [clone .cold]"
    #   -> "normkit::kernels::avx2::{anon}::f"
    function qualified(name,    s, out, i, c, depth, n, parts) {
      s = name
      gsub(/\(anonymous namespace\)/, "{anon}", s)
      gsub(/ \[clone [^]]*\]/, "", s)
      gsub(/ const::/, "::", s)   # a lambda inside a const lambda: "...::operator()(long) const::{lambda...}"
      gsub(/::operator [^(]*/, "::operator_conversion", s)   # operator float(), operator new
      gsub(/operator(<<=|>>=|<<|>>|<=>|<=|>=|->\*|->|<|>|\(\)|\[\])/, "operator_symbol", s)
      out = ""; depth = 0
      for (i = 1; i <= length(s); i++) {
        c = substr(s, i, 1)
        if (c == "<" || c == "(") depth++
        else if (c == ">" || c == ")") { if (depth > 0) depth-- }
        else if (depth == 0) out = out c
      }
      n = split(out, parts, " ")
      for (i = n; i >= 1; i--)
        if (parts[i] != "" && parts[i] != "const" && parts[i] != "volatile" && parts[i] != "&" && parts[i] != "&&")
          return parts[i]
      return out
    }
    function is_allowed(q,    i, n, prefixes) {
      n = split(allowed, prefixes, " ")
      for (i = 1; i <= n; i++) if (index(q, prefixes[i]) == 1) return 1
      return 0
    }
    # Is this disassembled instruction AVX (VEX/EVEX-encoded, or AVX-512 masks)?
    function is_avx(insn,    words, n, i, m) {
      if (insn ~ /%[yz]mm[0-9]/) return 1
      n = split(insn, words, /[ \t]+/)
      for (i = 1; i <= n; i++) {
        m = words[i]
        if (m == "" || m ~ /^(rep|repz|repnz|repe|repne|lock|notrack|bnd|data16|addr32|cs|ds|ss|es|fs|gs|rex.*|\{.*\})$/) continue
        if (m ~ /^v/ && m !~ /^ver[rw]$/) return 1      # every VEX/EVEX mnemonic starts with v
        if (m ~ /^k(mov|and|andn|or|xor|xnor|not|test|ortest|shiftl|shiftr|unpck|add)[bwdq]/) return 1
        return 0
      }
      return 0
    }
    function finish_function() {
      if (fn == "") return
      if (fn_avx > 0) {
        if (fn_allowed) allowed_avx++
        else {
          bad++
          printf "LEAK: %s%s\n      %d AVX instruction(s), first: %s\n", (obj != "" ? obj ": " : ""), fn, fn_avx, fn_first
        }
      }
      functions++
      fn = ""
    }
    /^In archive / { next }
    /:[ \t]+file format / { finish_function(); obj = $1; sub(/:$/, "", obj); next }
    /^[0-9a-f]+ <.*>:$/ {
      finish_function()
      fn = $0
      sub(/^[0-9a-f]+ </, "", fn)
      sub(/>:$/, "", fn)
      fn_allowed = is_allowed(qualified(fn))
      fn_avx = 0; fn_first = ""
      next
    }
    /^ *[0-9a-f]+:\t/ {
      if (fn == "") { fn = "(code before any symbol)"; fn_allowed = 0; fn_avx = 0; fn_first = "" }
      insn = $0
      sub(/^ *[0-9a-f]+:\t/, "", insn)
      sub(/[ \t]*#.*$/, "", insn)   # objdump comments (resolved addresses)
      if (is_avx(insn)) { if (fn_avx == 0) fn_first = insn; fn_avx++ }
      next
    }
    END {
      finish_function()
      if (functions == 0) {
        printf "check_isa_symbols: %s: no functions found in the disassembly (stripped? empty?)\n", file
        exit 2
      }
      printf "check_isa_symbols: %s: %d functions, %d with AVX inside the allowed namespaces (%s), %d outside\n", \
             file, functions, allowed_avx, allowed, bad
      if (bad > 0) {
        print "FAIL: AVX code outside the per-ISA kernel namespaces: an inline function or template shared by"
        print "      translation units compiled with different -m flags (the ODR trap), or ISA flags on baseline code."
        exit 1
      }
      if (expect_avx && allowed_avx == 0) {
        print "FAIL: --expect-avx: no AVX code found in the allowed namespaces, so this check sees nothing;"
        print "      were the AVX kernels built, and is the library unstripped?"
        exit 1
      }
      print "OK"
    }
  ' "$listing" || status=$?
  rm -f "$listing"
  trap - EXIT
  [ "$status" -eq 0 ] || break
done
exit "$status"
