// tests/fuzz/fuzz_norms.cpp - libFuzzer target for normkit's C++ entry points.
//
// Each input is decoded into one call of a forward or backward norm
// (normkit/norms.hpp): the norm kind, dtype, shape, strides, layout, eps,
// momentum, num_groups, optional parameters / statistics / running statistics
// (right or wrong shapes and dtypes), aliasing of the output with an input,
// the kernel path, and the values. Every tensor gets its own heap allocation of
// exactly the bytes its view spans (an empty view gets a 0-byte allocation), so
// AddressSanitizer reports any read or write outside the views (build with
// -fsanitize=fuzzer,address,undefined; scripts/fuzz.sh does).
//
// Oracles (any failure prints the decoded call and aborts, so libFuzzer saves
// the reproducer):
//  1. Exceptions: normkit::Error is the expected answer to bad arguments; any
//     other exception type is a bug.
//  2. Nothing changes on Error: when a call throws, every byte of every
//     allocation (inputs, outputs, running statistics, padding) is as before
//     ("arguments are checked before any kernel runs").
//  3. Inputs are not modified: when a call returns, every byte that is not an
//     element of an output view is as before - inputs (x, dy, weight, bias,
//     style, statistics given to a backward, running statistics in eval mode),
//     padding between strided elements, and bytes of x that an interleaved y
//     does not cover. The outputs are y/dx/dweight/dbias/dstyle*/mean/rstd, and
//     the running statistics when the call updates them (BatchNorm training,
//     InstanceNorm with input statistics). In place (y is x, dx is dy or x),
//     the shared elements are outputs.
//  4. Finite outputs for finite inputs (the rule, precisely). Output elements
//     are poisoned with NaN before the call, so an element the call forgot to
//     write also fails this check. Finite results are required when ALL of:
//     a. every element of every input the call reads is finite (x, dy, weight,
//        bias, style / style statistics, the mean/rstd given to a backward,
//        running statistics when they are read), and x is not empty (empty
//        calls report NaN statistics, as PyTorch does);
//     b. the normalizing factor rstd = 1/sqrt(var + eps) has a finite bound R:
//        - statistics from the data (LayerNorm, BatchNorm training,
//          InstanceNorm with input stats, GroupNorm, AdaIN's content and style
//          feature map): R = 1/sqrt(eps rounded to the accumulation type) when
//          that is > 0; or, when every statistics group (row, channel,
//          (sample, channel), (sample, group)) is "well conditioned" - its
//          spread max - min is at least 2^-8 of its largest |value| and at
//          least 2^-40 (float accumulation) / 2^-400 (double) so that its
//          variance neither cancels nor underflows - R = 2*sqrt(2M)/spread
//          (var >= spread^2 / 2M for M elements), and then |xhat| <= 2*sqrt(M)
//          (Samuelson: |x - mean| / std <= sqrt(M - 1)) instead of 3*max|x|*R.
//          So eps = 0 with a constant group (var = 0, rstd = inf, 0 * inf)
//          legitimately gives NaN, and so does a tiny eps with a nearly
//          constant group whose output then exceeds the dtype's range.
//          RMSNorm: the same with "well conditioned" = the row's max |x| is at
//          least 2^-40 / 2^-400 (no cancellation in mean(x^2)).
//        - running statistics (BatchNorm eval, InstanceNorm without input
//          stats): min(running_var) + eps > 0 (in double), R = 1/sqrt of it;
//          a negative running variance is not a finite input's variance.
//        - backward: R = max |rstd given|; the sums of x - mean given (which
//          refine a rounded saved mean) and xhat = (x - mean) * R must fit the
//          accumulation type too, whatever dy and the weight are.
//     c. a bound on every output's magnitude, computed from the maxima of the
//        inputs (X = max|x|, D = max|dy|, W = max|weight| or 1, B = max|bias|,
//        M = elements per statistic, ...) - e.g. forward |y| <= |xhat|*W + B,
//        LayerNorm backward |dx| <= R*(2*D*W + xh^2*D*W), xh = (3X + max|mean|)*R,
//        dweight <= rows*D*xh, running stats <= |1-m|*max|r| + |m|*4X^2*M/(M-1)
//        - is at most 1/16 of the largest finite value of that output's dtype
//        (65504 for float16), and the bound times the element count at most
//        1/16 of the accumulation type's (float for float32/16-bit x, double
//        for float64), so no legitimate overflow can occur. The kernels fold
//        weight * rstd (style_std * rstd for AdaIN) into one factor, so that
//        product must fit the accumulation type too (a denormal eps gives
//        rstd ~ 1e22, and a weight of 1e17 then overflows float).
//     d. eps is a number of the accumulation type: eps <= FLT_MAX for float32
//        and 16-bit x (normkit takes any finite double; AdaIN then forms
//        sqrt(var + eps) = inf in float).
//     Otherwise (non-finite input, eps = 0 with a constant group, huge values,
//     a float16 output that overflows) only oracles 1-3 apply.
//  5. In place equals out of place: when y / dx is exactly x or dy (allowed by
//     norms.hpp) and the call returns, it is made again from the same inputs
//     with that output in memory of its own; every output must be the same,
//     element for element (NaN where NaN). So no kernel reads an element of x
//     or dy after writing the output over it - a wrong result that oracle 4
//     cannot see unless it happens to overflow.
//  6. Error messages start with the name of one of the call's arguments and ":".
//  The fused forms (normkit/fused.hpp):
//  7. Every forward gets a drawn epilogue (activation, quantize, scale, scales).
//     A quantized output that returned is in range: int8 in [-127, 127] (the
//     poison -128 marks an unwritten element), float8_e4m3 |v| <= 448 or NaN.
//  8. add_layer_norm / add_rms_norm: sum is x + residual (+ residual_bias) as
//     computed here before the call (expected_sum(): the accumulation type,
//     then one rounding to x's dtype), bit for bit; y, mean, rstd and scales
//     equal layer_norm / rms_norm called on the returned sum (same epilogue,
//     fresh outputs), bit for bit. The finite rule uses the statistics of s.
//  9. fold_batch_norm: the outputs equal fused.hpp's formula in double,
//     rounded once (float32 / float64 exactly; 16-bit within one unit).
//  Known normkit limits (known_issue()) are skipped so that a run stays useful;
//  set NORMKIT_FUZZ_STRICT=1 to check them too. Remove an entry once it is fixed.
//
// Environment: NORMKIT_FUZZ_VERBOSE=1 prints every decoded call and its
// outcome (use it when replaying a reproducer: ./fuzz_norms crash-<hash>);
// NORMKIT_FUZZ_STRICT=1 (above).
#include <normkit/normkit.hpp>

#include <algorithm>
#include <cctype>
#include <cinttypes>
#include <cstdarg>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace nk = normkit;

namespace {

// ---- byte reader and a PRNG for bulk values ---------------------------------
struct Bytes {
  const std::uint8_t* data;
  std::size_t size;
  std::size_t pos = 0;
  std::uint8_t u8() { return pos < size ? data[pos++] : 0; }
  std::uint16_t u16() { return std::uint16_t(u8() | (u8() << 8)); }
  std::uint64_t u64() {
    std::uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= std::uint64_t(u8()) << (8 * i);
    return v;
  }
  // 0 .. k-1 (k <= 256).
  int below(int k) { return k <= 1 ? 0 : int(u8() % unsigned(k)); }
  // True with probability about p/256.
  bool chance(int p) { return u8() < p; }
  template <class T, std::size_t K>
  T pick(const T (&table)[K]) { return table[below(int(K))]; }
};

struct Rng {
  std::uint64_t s;
  std::uint64_t next() {  // splitmix64
    std::uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  double unit() { return double(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  int below(int k) { return int(next() % std::uint64_t(k)); }
};

// ---- the call's description (printed on failure or with NORMKIT_FUZZ_VERBOSE) --
std::string g_desc;
bool g_verbose = false;

void note(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void note(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  g_desc += buf;
  if (g_verbose) std::fputs(buf, stderr);  // as decoded (a crash in decoding still shows it)
}

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "\n==== normkit fuzz failure: %s\n---- decoded call:\n%s\n", what.c_str(), g_desc.c_str());
  std::fflush(stderr);
  std::abort();
}

// ---- dtypes -----------------------------------------------------------------
const nk::DType kDTypes[] = {nk::DType::float32, nk::DType::float64, nk::DType::float16, nk::DType::bfloat16};

bool is16(nk::DType d) { return d == nk::DType::float16 || d == nk::DType::bfloat16; }
int esize(nk::DType d) { return nk::element_size(d); }
double dtype_max(nk::DType d) {
  switch (d) {
    case nk::DType::float32: return double(std::numeric_limits<float>::max());
    case nk::DType::float64: return std::numeric_limits<double>::max();
    case nk::DType::float16: return 65504.0;
    case nk::DType::bfloat16: return 3.3895313892515355e38;
    case nk::DType::int8: return 127.0;
    case nk::DType::float8_e4m3: return 448.0;
  }
  return 0;
}
double acc_max(nk::DType x) { return x == nk::DType::float64 ? std::numeric_limits<double>::max() : 3.4e38; }
double acc_tiny(nk::DType x) { return x == nk::DType::float64 ? 0x1p-400 : 0x1p-40; }
double round_to_acc(double v, nk::DType x) {
  if (x == nk::DType::float64) return v;
  if (std::fabs(v) > double(std::numeric_limits<float>::max())) return std::copysign(INFINITY, v);
  return double(float(v));
}

double load(const unsigned char* p, nk::DType d) {
  switch (d) {
    case nk::DType::float32: { float f; std::memcpy(&f, p, 4); return f; }
    case nk::DType::float64: { double f; std::memcpy(&f, p, 8); return f; }
    case nk::DType::float16: { std::uint16_t b; std::memcpy(&b, p, 2); return double(float(nk::half::from_bits(b))); }
    case nk::DType::bfloat16: { std::uint16_t b; std::memcpy(&b, p, 2); return double(float(nk::bfloat16::from_bits(b))); }
    case nk::DType::int8: { std::int8_t b; std::memcpy(&b, p, 1); return double(b); }
    case nk::DType::float8_e4m3: return double(float(nk::float8_e4m3::from_bits(*p)));
  }
  return 0;
}
void store(unsigned char* p, nk::DType d, double v) {
  float f = std::fabs(v) > double(std::numeric_limits<float>::max()) ? float(std::copysign(INFINITY, v))
                                                                       : float(v);  // NaN stays NaN
  switch (d) {
    case nk::DType::float32: std::memcpy(p, &f, 4); return;
    case nk::DType::float64: std::memcpy(p, &v, 8); return;
    case nk::DType::float16: { std::uint16_t b = nk::half(f).bits; std::memcpy(p, &b, 2); return; }
    case nk::DType::bfloat16: { std::uint16_t b = nk::bfloat16(f).bits; std::memcpy(p, &b, 2); return; }
    // The quantized dtypes are only ever outputs, poisoned here: NaN gives
    // -128 (outside int8's quantized range [-127, 127], so the quantize oracle
    // sees an element the call did not write) and the E4M3 NaN.
    case nk::DType::int8: {
      const std::int8_t b = std::isnan(v) ? std::int8_t(-128) : std::int8_t(std::max(-128.0, std::min(127.0, v)));
      std::memcpy(p, &b, 1);
      return;
    }
    case nk::DType::float8_e4m3: *p = nk::float8_e4m3(f).bits; return;
  }
}
void store_bits(unsigned char* p, nk::DType d, std::uint64_t bits) { std::memcpy(p, &bits, esize(d)); }

// ---- allocations and tensors ----------------------------------------------------
struct Alloc {
  std::unique_ptr<unsigned char[]> mem;
  std::size_t bytes = 0;
  std::vector<unsigned char> before;   // snapshot just before the call
  std::vector<unsigned char> out_mask; // 1: byte of an output element
};

enum class Role { input, output, unused };

struct Tensor {
  std::string name;
  nk::TensorRef ref;  // given == false: not passed
  Role role = Role::input;
  int alloc = -1;
  bool stats_out = false;  // a statistics output: NaN for empty x is legitimate
  std::string in_place_of;  // an output that is exactly this input's view (in place)
};

struct World {
  std::vector<Alloc> allocs;
  std::vector<Tensor> tensors;
  Rng rng{0};
};

// Offsets (in elements, relative to data) of the lowest and highest element.
void span(const nk::Dims& shape, const nk::Dims& strides, std::int64_t& lo, std::int64_t& hi) {
  lo = hi = 0;
  for (int i = 0; i < shape.size(); ++i) {
    const std::int64_t e = (shape[i] - 1) * strides[i];
    (e < 0 ? lo : hi) += e;
  }
}

std::int64_t numel(const nk::Dims& shape) {
  std::int64_t n = 1;
  for (int i = 0; i < shape.size(); ++i) n *= shape[i];
  return n;
}

// Calls f(byte pointer) for every element of a view, in logical (row-major) order.
void for_each(const nk::TensorRef& t, const std::function<void(unsigned char*)>& f) {
  if (!t.given || t.data == nullptr) return;
  const std::int64_t n = t.numel();
  if (n <= 0) return;
  const int rank = t.shape.size();
  std::int64_t idx[nk::kMaxRank] = {};
  const int es = esize(t.dtype);
  for (std::int64_t k = 0; k < n; ++k) {
    std::int64_t off = 0;
    for (int i = 0; i < rank; ++i) off += idx[i] * t.strides[i];
    f(static_cast<unsigned char*>(t.data) + off * es);
    for (int i = rank - 1; i >= 0; --i) {
      if (++idx[i] < t.shape[i]) break;
      idx[i] = 0;
    }
  }
}

// Value generators: how a tensor's values are drawn.
enum Gen : int {
  gen_moderate, gen_uniform, gen_constant, gen_near_constant, gen_raw_bits, gen_sprinkled, gen_big, gen_tiny,
  gen_small_ints, gen_positive, kGenCount
};
const char* gen_name(int g) {
  static const char* names[] = {"moderate", "uniform", "constant", "near_constant", "raw_bits",
                                "sprinkled", "big", "tiny", "small_ints", "positive"};
  return g >= 0 && g < kGenCount ? names[g] : "poison";
}

struct GenState {
  int kind;
  double scale, base, constant;
};

GenState make_gen(int kind, Bytes& in, nk::DType d) {
  GenState g{kind, 1, 0, 0};
  g.scale = std::ldexp(1.0, in.below(25) - 12);  // 2^-12 .. 2^12
  const double bases[] = {1.0, 1000.0, 1e4, 1e6, -3.0, 65000.0, 1e20};
  g.base = bases[in.below(7)];
  const double consts[] = {0.0, 1.0, -2.5, 1e-3, 1e4, -0.0, 3e38, 1e-40};
  g.constant = consts[in.below(8)];
  (void)d;
  return g;
}

void gen_value(World& w, const GenState& g, nk::DType d, unsigned char* p) {
  Rng& r = w.rng;
  switch (g.kind) {
    case gen_moderate: store(p, d, double(int(r.below(257)) - 128) * g.scale / 16.0); return;
    case gen_uniform: store(p, d, (2 * r.unit() - 1) * g.scale); return;
    case gen_constant: store(p, d, g.constant); return;
    case gen_near_constant: {
      // base plus a few units in the last place of the dtype (cancellation).
      const double ulp = d == nk::DType::float64 ? 0x1p-52 : d == nk::DType::float32 ? 0x1p-23
                         : d == nk::DType::float16 ? 0x1p-10 : 0x1p-7;
      const double base = d == nk::DType::float16 ? std::min(g.base, 30000.0) : g.base;
      store(p, d, base * (1 + ulp * double(r.below(5) - 2)));
      return;
    }
    case gen_raw_bits: store_bits(p, d, r.next()); return;
    case gen_sprinkled: {
      if (r.below(16) == 0) {
        const double specials[] = {INFINITY, -INFINITY, NAN, dtype_max(d), -dtype_max(d), 1e-310, -0.0, 0.0};
        store(p, d, specials[r.below(8)]);
      } else {
        store(p, d, double(int(r.below(257)) - 128) * g.scale / 16.0);
      }
      return;
    }
    case gen_big: store(p, d, dtype_max(d) * (0.25 + 0.75 * r.unit()) * (r.below(2) ? 1 : -1)); return;
    case gen_tiny: {
      const double tiny = d == nk::DType::float64 ? 0x1p-1060 : d == nk::DType::float16 ? 0x1p-23 : 0x1p-140;
      store(p, d, tiny * double(r.below(9) - 4));
      return;
    }
    case gen_small_ints: store(p, d, double(r.below(3))); return;
    case gen_positive: store(p, d, (0.05 + r.unit()) * g.scale); return;
  }
}

// Allocates exactly the span of (shape, strides) of dtype d, fills it from
// `gen` (or with NaN when gen < 0, for outputs) and registers the tensor.
int add_alloc(World& w, std::size_t bytes) {
  Alloc a;
  a.bytes = bytes;
  a.mem.reset(new unsigned char[bytes]);  // new[0] is a valid, 0-byte allocation
  w.allocs.push_back(std::move(a));
  return int(w.allocs.size()) - 1;
}

void fill(World& w, int alloc, nk::DType d, int gen_kind, const GenState& g) {
  Alloc& a = w.allocs[alloc];
  const int es = esize(d);
  for (std::size_t off = 0; off + es <= a.bytes; off += es) {
    if (gen_kind < 0) store(a.mem.get() + off, d, NAN);
    else gen_value(w, g, d, a.mem.get() + off);
  }
}

// ---- strides --------------------------------------------------------------------
const char* kStrideNames[] = {"contiguous", "padded", "negative", "broadcast", "permuted", "arbitrary", "inner2"};
enum StrideMode { st_contiguous, st_padded, st_negative, st_broadcast, st_permuted, st_arbitrary, st_inner2, kStrideCount };

nk::Dims make_strides(const nk::Dims& shape, int mode, Bytes& in) {
  nk::Dims s = nk::contiguous_strides(shape);
  const int rank = shape.size();
  switch (mode) {
    case st_contiguous: break;
    case st_padded:
    case st_negative:
    case st_inner2: {
      std::int64_t next = mode == st_inner2 ? 2 : 1;
      for (int i = rank - 1; i >= 0; --i) {
        s[i] = next;
        next = next * std::max<std::int64_t>(shape[i], 1) + (mode == st_inner2 ? 0 : in.below(4));
      }
      if (mode == st_negative)
        for (int i = 0; i < rank; ++i)
          if (in.chance(128)) s[i] = -s[i];
      break;
    }
    case st_broadcast:
      for (int i = 0; i < rank; ++i)
        if (in.chance(100)) s[i] = 0;
      break;
    case st_permuted: {
      int perm[nk::kMaxRank];
      for (int i = 0; i < rank; ++i) perm[i] = i;
      for (int i = rank - 1; i > 0; --i) std::swap(perm[i], perm[in.below(i + 1)]);
      std::int64_t next = 1;
      for (int k = rank - 1; k >= 0; --k) {
        s[perm[k]] = next;
        next *= std::max<std::int64_t>(shape[perm[k]], 1);
      }
      break;
    }
    case st_arbitrary:
      for (int i = 0; i < rank; ++i) s[i] = in.below(13) - 6;
      break;
  }
  return s;
}

std::string dims_str(const nk::Dims& d) { return d.to_string(); }

// A tensor with its own allocation of exactly its span.
Tensor& make_tensor(World& w, Bytes& in, const std::string& name, nk::DType d, const nk::Dims& shape, int stride_mode,
                    Role role, int gen_kind, bool null_if_empty = false) {
  const nk::Dims strides = make_strides(shape, stride_mode, in);
  std::int64_t lo, hi;
  span(shape, strides, lo, hi);
  const std::int64_t n = numel(shape);
  const std::size_t bytes = n > 0 ? std::size_t(hi - lo + 1) * std::size_t(esize(d)) : 0;
  const int a = add_alloc(w, bytes);
  const GenState g = make_gen(gen_kind < 0 ? 0 : gen_kind, in, d);
  fill(w, a, d, gen_kind, g);
  Tensor t;
  t.name = name;
  t.role = role;
  t.alloc = a;
  void* data = n > 0 ? static_cast<void*>(w.allocs[a].mem.get() + (-lo) * esize(d))
                     : (null_if_empty ? nullptr : static_cast<void*>(w.allocs[a].mem.get()));
  t.ref = nk::TensorRef(data, d, shape, strides);
  note("  %-12s %-8s shape %s strides %s (%s) values %s%s\n", name.c_str(), nk::to_string(d), dims_str(shape).c_str(),
       dims_str(strides).c_str(), kStrideNames[stride_mode], gen_name(gen_kind), data ? "" : " data=null");
  w.tensors.push_back(t);
  return w.tensors.back();
}

Tensor not_given(World& w, const std::string& name) {
  Tensor t;
  t.name = name;
  t.role = Role::unused;
  note("  %-12s not given\n", name.c_str());
  w.tensors.push_back(t);
  return t;
}

// y sharing x's memory: exactly x (in place), shifted by k elements within one
// allocation spanning both, or x's memory with other strides. Returns false
// when that cannot be built (then the caller makes a separate tensor).
bool make_aliased(World& w, Bytes& in, const std::string& name, const Tensor& x_in, int mode, Tensor& out) {
  const Tensor x = x_in;  // a copy: w.tensors changes below
  out.name = name;
  out.role = Role::output;
  if (mode == 0) {  // exactly x
    out.ref = x.ref;
    out.alloc = x.alloc;
    out.in_place_of = x.name;
    note("  %-12s = %s (same view, in place)\n", name.c_str(), x.name.c_str());
    w.tensors.push_back(out);
    return true;
  }
  if (x.ref.numel() <= 0 || x.ref.data == nullptr) return false;
  const nk::DType d = x.ref.dtype;
  const int es = esize(d);
  nk::Dims ys = x.ref.strides;
  std::int64_t shift = 0;
  if (mode == 1) {  // same strides, shifted
    shift = in.below(9) - 4;
    if (shift == 0) shift = 1;
  } else {  // other strides over the same memory (e.g. contiguous over a padded x)
    ys = make_strides(x.ref.shape, in.below(kStrideCount), in);
    shift = in.below(5) - 2;
  }
  // One allocation covering x's span and y's (x, and any view of x's
  // memory, is re-homed into it).
  std::int64_t xlo, xhi, ylo, yhi;
  span(x.ref.shape, x.ref.strides, xlo, xhi);
  span(x.ref.shape, ys, ylo, yhi);
  // Only over an allocation that is exactly x's span (not one already shared
  // with another output's overlap: that memory is not re-homed here).
  {
    const Alloc& own = w.allocs[x.alloc];
    if (own.bytes != std::size_t(xhi - xlo + 1) * es ||
        static_cast<unsigned char*>(x.ref.data) != own.mem.get() + (-xlo) * es)
      return false;
  }
  const std::int64_t lo = std::min(xlo, shift + ylo), hi = std::max(xhi, shift + yhi);
  const int a = add_alloc(w, std::size_t(hi - lo + 1) * es);
  Alloc& na = w.allocs[a];
  Alloc& old = w.allocs[x.alloc];
  unsigned char* xdata = na.mem.get() + (-lo) * es;
  for (std::size_t off = 0; off + es <= na.bytes; off += es)
    gen_value(w, GenState{gen_moderate, 1, 0, 0}, d, na.mem.get() + off);
  std::memcpy(xdata + xlo * es, old.mem.get(), old.bytes);
  for (Tensor& t : w.tensors)
    if (t.alloc == x.alloc && t.ref.data == x.ref.data) {
      t.ref.data = xdata;
      t.alloc = a;
    }
  old.bytes = 0;  // no longer used
  out.ref = nk::TensorRef(xdata + shift * es, d, x.ref.shape, ys);
  out.alloc = a;
  note("  %-12s shares %s's memory: offset %" PRId64 " elements, strides %s\n", name.c_str(), x.name.c_str(), shift,
       dims_str(ys).c_str());
  w.tensors.push_back(out);
  return true;
}

Tensor* find(World& w, const std::string& name) {
  for (Tensor& t : w.tensors)
    if (t.name == name) return &t;
  return nullptr;
}

// ---- decoding helpers ----------------------------------------------------------
nk::Dims decode_shape(Bytes& in) {
  const int ranks[] = {2, 3, 4, 5, 2, 3, 4, 1, 0, 6, 4, 3};
  const int rank = in.pick(ranks);
  const std::int64_t extents[] = {1, 2, 3, 4, 5, 7, 8, 16, 0, 1, 2, 3, 6, 33, 64, 2};
  nk::Dims s;
  for (int i = 0; i < rank; ++i) s.push_back(in.pick(extents));
  // At most a few thousand elements - counting a 0 extent as 1, since the
  // parameters and statistics of an empty x have the other extents.
  auto nonzero_numel = [&] {
    std::int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= std::max<std::int64_t>(s[i], 1);
    return n;
  };
  while (nonzero_numel() > 4096) {
    int big = 0;
    for (int i = 1; i < rank; ++i)
      if (s[i] > s[big]) big = i;
    s[big] /= 2;
  }
  return s;
}

double decode_eps(Bytes& in) {
  const double table[] = {1e-5, 1e-5, 0.0, 1e-12, -1e-5, NAN, INFINITY, -INFINITY, 1.0, 1e-300, 5e-324, 1e10,
                          std::numeric_limits<double>::max(), 1e-45, 1e-3, 0.1};
  const int k = in.below(17);
  if (k < 16) return table[k];
  std::uint64_t bits = in.u64();
  double v;
  std::memcpy(&v, &bits, 8);
  return v;
}

double decode_momentum(Bytes& in) {
  const double table[] = {0.1, 0.1, 0.0, 1.0, 0.5, -0.5, 2.0, 1e300, NAN, INFINITY};
  return in.pick(table);
}

std::optional<nk::Layout> decode_layout(Bytes& in, int rank) {
  const int k = in.below(12);
  if (k < 4) return std::nullopt;  // default: channels-first of the rank
  if (k < 8) {                     // a layout of the right rank
    switch (rank) {
      case 2: return nk::Layout::NC;
      case 3: return k % 2 ? nk::Layout::NCL : nk::Layout::NLC;
      case 4: return k % 2 ? nk::Layout::NCHW : nk::Layout::NHWC;
      case 5: return k % 2 ? nk::Layout::NCDHW : nk::Layout::NDHWC;
      default: return nk::Layout::NCHW;
    }
  }
  if (k < 11) return static_cast<nk::Layout>(in.below(7));  // any, often the wrong rank
  return static_cast<nk::Layout>(7 + in.below(3));           // not an enumerator
}

// The layout the call will use (when valid): channel axis, per-sample axes.
struct Geometry {
  bool ok = false;
  int rank = 0, caxis = 1;
  std::int64_t n = 0, c = 0, s = 0;
};
Geometry geometry_of(const nk::Dims& shape, std::optional<nk::Layout> layout) {
  Geometry g;
  g.rank = shape.size();
  int lrank;
  bool last;
  nk::Layout l;
  if (layout) {
    const int v = int(*layout);
    if (v < 0 || v > 6) return g;
    l = *layout;
  } else {
    if (g.rank < 2 || g.rank > 5) return g;
    l = nk::default_layout(g.rank);
  }
  lrank = nk::layout_rank(l);
  last = nk::is_channels_last(l);
  if (lrank != g.rank) return g;
  g.caxis = last ? g.rank - 1 : 1;
  g.n = shape[0];
  g.c = shape[g.caxis];
  g.s = 1;
  for (int i = 1; i < g.rank; ++i)
    if (i != g.caxis) g.s *= shape[i];
  g.ok = true;
  return g;
}

// A parameter-like tensor (weight, bias, running stats, statistics): usually
// right, sometimes not given, of a wrong shape, dtype or contiguity.
struct ParamChoice {
  bool given;
  nk::Dims shape;
  nk::DType dtype;
  int stride_mode;
};
ParamChoice decode_param(Bytes& in, const nk::Dims& right_shape, nk::DType right_dtype, int p_absent) {
  ParamChoice p{true, right_shape, right_dtype, st_contiguous};
  if (in.chance(p_absent)) {
    p.given = false;
    return p;
  }
  switch (in.below(16)) {
    case 0: p.dtype = in.pick(kDTypes); break;  // any dtype
    case 1:
      if (p.shape.size() > 0) p.shape[in.below(p.shape.size())] += 1;  // wrong extent
      else p.shape.push_back(2);
      break;
    case 2:  // another rank, same count
      if (p.shape.size() > 0 && p.shape.size() < nk::kMaxRank) p.shape.push_back(1);
      break;
    case 3: p.stride_mode = st_inner2; break;  // non-contiguous
    case 4: p.stride_mode = st_negative; break;
    case 5:  // flattened (same count, rank 1)
      p.shape = nk::Dims{numel(right_shape)};
      break;
    default: break;
  }
  return p;
}

Tensor& make_param(World& w, Bytes& in, const std::string& name, const ParamChoice& p, Role role, int gen) {
  if (!p.given) {
    not_given(w, name);
    return w.tensors.back();
  }
  Tensor& t = make_tensor(w, in, name, p.dtype, p.shape, p.stride_mode, role, gen);
  return t;
}

int decode_gen(Bytes& in) {
  // Mostly finite, well-behaved values; sometimes anything.
  const int table[] = {gen_moderate, gen_moderate, gen_uniform, gen_uniform, gen_moderate, gen_constant,
                       gen_near_constant, gen_raw_bits, gen_sprinkled, gen_big, gen_tiny, gen_small_ints,
                       gen_uniform, gen_moderate, gen_positive, gen_uniform};
  return in.pick(table);
}

// ---- the finite-output rule: per-group summaries of the input ----------------------
struct GroupSummary {
  double lo = INFINITY, hi = -INFINITY, maxabs = 0;
  std::int64_t count = 0;
};

// Summaries of x per statistics group; group_of(logical multi-index) gives the group.
std::vector<GroupSummary> summarize(const nk::TensorRef& x, std::int64_t groups,
                                    const std::function<std::int64_t(const std::int64_t*)>& group_of) {
  std::vector<GroupSummary> out(std::max<std::int64_t>(groups, 0));
  const std::int64_t n = x.numel();
  const int rank = x.shape.size();
  std::int64_t idx[nk::kMaxRank] = {};
  const int es = esize(x.dtype);
  for (std::int64_t k = 0; k < n; ++k) {
    std::int64_t off = 0;
    for (int i = 0; i < rank; ++i) off += idx[i] * x.strides[i];
    const double v = load(static_cast<const unsigned char*>(x.data) + off * es, x.dtype);
    const std::int64_t gi = group_of(idx);
    if (gi < 0 || gi >= std::int64_t(out.size())) return {};  // not a valid call: no summaries
    GroupSummary& s = out[gi];
    s.lo = std::min(s.lo, v);
    s.hi = std::max(s.hi, v);
    s.maxabs = std::max(s.maxabs, std::fabs(v));
    s.count++;
    for (int i = rank - 1; i >= 0; --i) {
      if (++idx[i] < x.shape[i]) break;
      idx[i] = 0;
    }
  }
  return out;
}

double max_abs(const nk::TensorRef& t) {
  double m = 0;
  for_each(t, [&](unsigned char* p) { m = std::max(m, std::fabs(load(p, t.dtype))); });
  return m;
}
double min_val(const nk::TensorRef& t) {
  double m = INFINITY;
  for_each(t, [&](unsigned char* p) { m = std::min(m, load(p, t.dtype)); });
  return m;
}
bool all_finite(const nk::TensorRef& t) {
  bool ok = true;
  for_each(t, [&](unsigned char* p) { ok = ok && std::isfinite(load(p, t.dtype)); });
  return ok;
}

// Bound on rstd (and on |xhat|) from data statistics: see the rule at the top.
struct RstdBound {
  bool ok = false;
  double r = INFINITY;   // max rstd
  double xh = INFINITY;  // max |xhat|
};
RstdBound data_rstd_bound(const std::vector<GroupSummary>& groups, double eps, nk::DType xd, bool rms) {
  RstdBound b;
  double X = 0, min_spread = INFINITY;
  std::int64_t M = 1;
  bool conditioned = true;
  for (const auto& g : groups) {
    if (g.count == 0) continue;
    X = std::max(X, g.maxabs);
    M = std::max(M, g.count);
    const double spread = rms ? g.maxabs : g.hi - g.lo;
    if (!(spread >= acc_tiny(xd)) || (!rms && !(spread >= 0x1p-8 * g.maxabs))) conditioned = false;
    min_spread = std::min(min_spread, spread);
  }
  const double eps_a = round_to_acc(eps, xd);
  if (conditioned && min_spread > 0) {
    b.ok = true;
    b.r = 2 * std::sqrt(2.0 * double(M)) / min_spread;
    b.xh = 2 * std::sqrt(double(M)) + 1;
  }
  if (eps_a > 0) {
    const double r = 1 / std::sqrt(eps_a);
    if (!b.ok) b.xh = 3 * X * r;
    b.r = std::min(b.r, r);
    b.ok = true;
  }
  return b;
}

// Collects output bounds; finite outputs are required only if all fit.
struct Bounds {
  bool ok = true;
  nk::DType acc_x;
  std::int64_t total;
  void need(bool cond) { ok = ok && cond; }
  // An output of dtype d whose magnitude is at most v.
  void out(double v, nk::DType d) {
    ok = ok && std::isfinite(v) && v <= dtype_max(d) / 16 && v * double(std::max<std::int64_t>(total, 1)) <= acc_max(acc_x) / 16;
  }
};

// ---- the call ---------------------------------------------------------------------
enum Kind {
  k_layer, k_rms, k_bn_train, k_bn_eval, k_in_input, k_in_running, k_group, k_adain_map, k_adain_stats,
  k_layer_bw, k_rms_bw, k_bn_train_bw, k_bn_eval_bw, k_in_input_bw, k_in_running_bw, k_group_bw,
  k_adain_map_bw, k_adain_stats_bw,
  // The fused forms (normkit/fused.hpp), after the others so that existing
  // corpus inputs keep their kind.
  k_add_layer, k_add_rms, k_fold, kKindCount
};
bool is_backward_kind(int k) { return k >= k_layer_bw && k <= k_adain_stats_bw; }
const char* kKindNames[] = {"layer_norm", "rms_norm", "batch_norm(training)", "batch_norm(eval)",
                            "instance_norm(use_input_stats)", "instance_norm(running stats)", "group_norm",
                            "adaptive_instance_norm(style map)", "adaptive_instance_norm(style stats)",
                            "layer_norm_backward", "rms_norm_backward", "batch_norm_backward(training)",
                            "batch_norm_backward(eval)", "instance_norm_backward(use_input_stats)",
                            "instance_norm_backward(running stats)", "group_norm_backward",
                            "adaptive_instance_norm_backward(style map)",
                            "adaptive_instance_norm_backward(style stats)", "add_layer_norm", "add_rms_norm",
                            "fold_batch_norm"};

const std::vector<std::string>& kernel_paths() {
  static const std::vector<std::string> paths = nk::runtime_info().kernel_paths_supported;
  return paths;
}

std::string layout_str(std::optional<nk::Layout> l) {
  if (!l) return "default";
  const int v = int(*l);
  if (v < 0 || v > 6) return "Layout(" + std::to_string(v) + ") (not an enumerator)";
  return nk::to_string(*l);
}

// Known bugs in normkit, each a predicate on the decoded call. Remove an entry
// once normkit is fixed; NORMKIT_FUZZ_STRICT=1 ignores the list.
bool g_strict = false;
double g_rstd_max = 0;  // the largest rstd a backward uses (given, or bounded from eps)
const char* known_issue(int kind, const nk::TensorRef& x, const nk::TensorRef&) {
  // The channel norms' backward apply step (BatchNorm, and channels-last
  // InstanceNorm / GroupNorm / AdaIN) folds -rstd^2 * mean(g * xhat) into one
  // per-channel scale in the accumulation type, which overflows once
  // rstd > sqrt(max) (1.8e19 for float: var + eps < 3e-39, only with eps = 0)
  // although dx itself is finite. (The rows kernels form xhat first and are
  // checked: LayerNorm, RMSNorm, channels-first InstanceNorm/GroupNorm/AdaIN.)
  if (is_backward_kind(kind) && kind != k_layer_bw && kind != k_rms_bw && kind != k_bn_eval_bw &&
      kind != k_in_running_bw && g_rstd_max > std::sqrt(acc_max(x.dtype)) / 4)
    return "channel backward overflows rstd^2 for rstd > sqrt(max of the accumulation type)";
  return nullptr;
}

// Oracle 5 (see the top): after a call that returned with an output exactly
// an input's view, restores every allocation to its bytes before the call,
// moves that output to a fresh NaN-filled allocation of the same span, calls
// again and compares every output with the first call's.
void check_in_place_matches_out_of_place(World& w, const std::function<void()>& call) {
  bool in_place = false;
  for (const Tensor& t : w.tensors) in_place = in_place || (t.role == Role::output && t.ref.given && !t.in_place_of.empty());
  if (!in_place) return;
  std::vector<std::vector<double>> first(w.tensors.size());
  for (std::size_t i = 0; i < w.tensors.size(); ++i) {
    const Tensor& t = w.tensors[i];
    if (t.role == Role::output && t.ref.given)
      for_each(t.ref, [&](unsigned char* p) { first[i].push_back(load(p, t.ref.dtype)); });
  }
  for (Alloc& a : w.allocs)
    if (a.bytes > 0) std::memcpy(a.mem.get(), a.before.data(), a.bytes);
  for (Tensor& t : w.tensors) {
    if (t.role != Role::output || !t.ref.given || t.in_place_of.empty()) continue;
    std::int64_t lo, hi;
    span(t.ref.shape, t.ref.strides, lo, hi);
    const int es = esize(t.ref.dtype);
    const int a = add_alloc(w, t.ref.numel() > 0 ? std::size_t(hi - lo + 1) * es : 0);
    fill(w, a, t.ref.dtype, -1, GenState{});
    t.ref.data = w.allocs[a].mem.get() + (-lo) * es;
    t.alloc = a;
    note("  (oracle 5: again with %s in its own memory instead of %s's)\n", t.name.c_str(), t.in_place_of.c_str());
  }
  try {
    call();
  } catch (const std::exception& e) {
    fail(std::string("in place returned, but the same call out of place threw: ") + e.what());
  }
  for (std::size_t i = 0; i < w.tensors.size(); ++i) {
    const Tensor& t = w.tensors[i];
    if (t.role != Role::output || !t.ref.given) continue;
    std::size_t k = 0;
    for_each(t.ref, [&](unsigned char* p) {
      const double want = load(p, t.ref.dtype), got = k < first[i].size() ? first[i][k] : NAN;
      if (!(got == want || (std::isnan(got) && std::isnan(want)))) {
        char msg[256];
        std::snprintf(msg, sizeof msg, "in place differs from out of place: %s element %zu (logical order) is %.17g in place, %.17g out of place",
                      t.name.c_str(), k, got, want);
        fail(msg);
      }
      ++k;
    });
  }
}

// "x: ..." - what() starts with the name of an argument of the call: a tensor
// the call got (given or not) or one of its other parameters.
bool names_an_argument(const World& w, const char* what) {
  std::size_t n = 0;
  while (std::isalnum(static_cast<unsigned char>(what[n])) || what[n] == '_') ++n;
  if (n == 0 || what[n] != ':') return false;
  const std::string name(what, n);
  for (const Tensor& t : w.tensors)
    if (t.name == name) return true;
  static const char* scalars[] = {"normalized_shape", "eps", "momentum", "num_groups", "layout", "groups",
                                  "activation", "quantize", "scale", "epilogue"};
  for (const char* s : scalars)
    if (name == s) return true;
  return false;
}

// After a call that returned: every element of a quantized output is in the
// quantized range - int8 in [-127, 127] (the poison -128 marks an element not
// written), float8_e4m3 |value| <= 448 or NaN (every E4M3fn byte decodes to
// one of those; 0x7f / 0xff are NaN).
void check_quantized_range(World& w) {
  for (const Tensor& t : w.tensors) {
    if (t.role != Role::output || !t.ref.given || nk::is_float(t.ref.dtype)) continue;
    std::int64_t k = 0;
    for_each(t.ref, [&](unsigned char* p) {
      const double v = load(p, t.ref.dtype);
      const bool ok = t.ref.dtype == nk::DType::int8 ? (v >= -127 && v <= 127) : (std::isnan(v) || std::fabs(v) <= 448);
      if (!ok) {
        char msg[200];
        std::snprintf(msg, sizeof msg, "quantized output out of range: %s element %" PRId64 " (logical order) is %g (byte 0x%02x)",
                      t.name.c_str(), k, v, unsigned(*p));
        fail(msg);
      }
      ++k;
    });
  }
}

// ---- the fused forms (normkit/fused.hpp) ------------------------------------------
// add_layer_norm / add_rms_norm: residual (x's shape; x's trailing dims, or
// leading extents 1, broadcast; sometimes a wrong shape or dtype), an optional
// residual_bias (like weight), and sum: separate, or x / residual itself (in
// place), or overlapping x / residual / y where that is not allowed.
void make_residual_and_sum(World& w, Bytes& in, const nk::Dims& shape, const nk::Dims& param_shape, nk::DType pd) {
  const nk::DType xd = find(w, "x")->ref.dtype;
  const int rank = shape.size();
  nk::Dims rs = shape;
  nk::DType rd = xd;
  const int mode = in.below(16);  // 0-7: x's shape
  if (mode >= 8 && mode < 12 && rank > 0) {  // x's trailing dims
    const int drop = 1 + in.below(rank);
    rs = nk::Dims{};
    for (int i = drop; i < rank; ++i) rs.push_back(shape[i]);
  } else if (mode == 12 && rank > 0) {  // leading extents 1: (1, S, H)
    const int ones = 1 + in.below(rank);
    for (int i = 0; i < ones; ++i) rs[i] = 1;
  } else if (mode == 13) {
    rd = in.pick(kDTypes);
  } else if (mode == 14 && rank > 0) {
    rs[in.below(rank)] += 1;
  } else if (mode == 15 && rank < nk::kMaxRank) {  // one dim more than x
    rs = nk::Dims{2};
    for (int i = 0; i < rank; ++i) rs.push_back(shape[i]);
  }
  make_tensor(w, in, "residual", rd, rs, in.chance(170) ? st_contiguous : in.below(kStrideCount), Role::input,
              decode_gen(in));
  make_param(w, in, "residual_bias", decode_param(in, param_shape, pd, 150), Role::input, decode_gen(in));
  const int sm = in.below(16);
  Tensor t;
  if ((sm < 2 || sm == 4) && make_aliased(w, in, "sum", *find(w, "x"), sm < 2 ? 0 : 1 + in.below(2), t)) return;
  if ((sm == 2 || sm == 3 || sm == 5) &&
      make_aliased(w, in, "sum", *find(w, "residual"), sm != 5 ? 0 : 1 + in.below(2), t))
    return;
  if (sm == 6) {  // y's memory (never allowed)
    Tensor s = *find(w, "y");
    s.name = "sum";
    s.in_place_of.clear();
    note("  %-12s = y (same view)\n", "sum");
    w.tensors.push_back(s);
    return;
  }
  nk::Dims ss = shape;
  if (sm == 8 && rank > 0) ss[in.below(rank)] += 1;
  make_tensor(w, in, "sum", sm == 7 ? in.pick(kDTypes) : xd, ss,
              in.chance(170) ? st_contiguous : in.below(kStrideCount), Role::output, -1);
}

// v rounded to float, as IEEE addition rounds (ties to even; overflow to inf
// only from FLT_MAX + half an ulp on), without an out-of-range conversion.
double round_to_float(double v) {
  const double fmax = double(std::numeric_limits<float>::max());
  if (std::fabs(v) >= fmax + 0x1p103) return std::copysign(INFINITY, v);
  if (std::fabs(v) > fmax) return std::copysign(fmax, v);
  return double(float(v));
}

// s = x + residual (+ residual_bias) as add_layer_norm / add_rms_norm store it:
// (x + residual) + bias in the accumulation type (float, or double for float64
// x; each add computed exactly in double and rounded once to it, which is
// IEEE's float add), then rounded once to x's dtype. Without a bias this is
// x + residual rounded once to x's dtype. Into buf (contiguous, x's shape);
// false when the call cannot be valid (then it must throw).
bool expected_sum(World& w, const nk::Dims& normalized, std::vector<unsigned char>& buf, nk::TensorRef& out) {
  const nk::TensorRef x = find(w, "x")->ref, r = find(w, "residual")->ref, b = find(w, "residual_bias")->ref;
  const int rank = x.shape.size(), rrank = r.shape.size();
  if (!r.given || r.dtype != x.dtype || rrank > rank || normalized.size() > rank) return false;
  for (int i = 0; i < rrank; ++i)
    if (r.shape[i] != 1 && r.shape[i] != x.shape[rank - rrank + i]) return false;
  for (int i = 0; i < normalized.size(); ++i)
    if (normalized[i] != x.shape[rank - normalized.size() + i]) return false;
  const std::int64_t row = numel(normalized);
  std::vector<double> bv;
  for_each(b, [&](unsigned char* p) { bv.push_back(load(p, b.dtype)); });
  if (b.given && std::int64_t(bv.size()) != row) return false;
  const nk::DType xd = x.dtype;
  const int es = esize(xd);
  const std::int64_t n = x.numel();
  buf.assign(std::size_t(std::max<std::int64_t>(n, 0)) * es + 1, 0);
  out = nk::TensorRef(buf.data(), xd, x.shape, nk::contiguous_strides(x.shape));
  auto acc = [xd](double v) { return xd == nk::DType::float64 ? v : round_to_float(v); };
  std::int64_t idx[nk::kMaxRank] = {};
  for (std::int64_t k = 0; k < n; ++k) {
    std::int64_t xo = 0, ro = 0;
    for (int i = 0; i < rank; ++i) xo += idx[i] * x.strides[i];
    for (int i = 0; i < rrank; ++i) ro += (r.shape[i] == 1 ? 0 : idx[rank - rrank + i]) * r.strides[i];
    double v = acc(load(static_cast<const unsigned char*>(x.data) + xo * es, xd) +
                   load(static_cast<const unsigned char*>(r.data) + ro * es, xd));
    if (b.given) v = acc(v + bv[std::size_t(k % row)]);
    store(buf.data() + k * es, xd, v);
    for (int i = rank - 1; i >= 0; --i) {
      if (++idx[i] < x.shape[i]) break;
      idx[i] = 0;
    }
  }
  return true;
}

// Memory for a copy of t's view (same shape and strides), poisoned.
struct Scratch {
  std::vector<unsigned char> mem;
  nk::TensorRef ref;
};
Scratch scratch_like(const nk::TensorRef& t) {
  Scratch s;
  if (!t.given) return s;
  std::int64_t lo, hi;
  span(t.shape, t.strides, lo, hi);
  const int es = esize(t.dtype);
  s.mem.assign(t.numel() > 0 ? std::size_t(hi - lo + 1) * es : 1, 0);
  for (std::size_t off = 0; off + es <= s.mem.size(); off += es) store(s.mem.data() + off, t.dtype, NAN);
  s.ref = nk::TensorRef(s.mem.data() + (t.numel() > 0 ? -lo * es : 0), t.dtype, t.shape, t.strides);
  return s;
}

// Element k of a and b (logical order) have the same bytes, or are both NaN.
void check_same_bits(const nk::TensorRef& got, const nk::TensorRef& want, const std::string& what) {
  std::vector<unsigned char*> g, wv;
  for_each(got, [&](unsigned char* p) { g.push_back(p); });
  for_each(want, [&](unsigned char* p) { wv.push_back(p); });
  const int es = esize(got.dtype);
  for (std::size_t k = 0; k < g.size() && k < wv.size(); ++k) {
    if (std::memcmp(g[k], wv[k], es) == 0) continue;
    const double a = load(g[k], got.dtype), b = load(wv[k], want.dtype);
    if (std::isnan(a) && std::isnan(b)) continue;
    char msg[300];
    std::snprintf(msg, sizeof msg, "%s: element %zu (logical order) is %.17g, expected %.17g", what.c_str(), k, a, b);
    fail(msg);
  }
}

// The fused-equals-unfused oracle, after an add_ call that returned: sum is the
// expected s element for element (bits), and layer_norm / rms_norm called on
// that sum (the same views' strides, the same epilogue, fresh outputs) gives
// y, mean, rstd and the dynamic scales bit for bit.
void check_fused_equals_unfused(World& w, int kind, const nk::Dims& normalized, double eps,
                                std::optional<double> rms_eps, const nk::Epilogue& epi,
                                const nk::TensorRef& exp_sum, bool exp_ok) {
  auto ref = [&](const char* name) -> nk::TensorRef {
    const Tensor* t = find(w, name);
    return t ? t->ref : nk::TensorRef{};
  };
  if (!exp_ok) fail("add_ norm returned for a residual / residual_bias / normalized_shape it cannot take");
  const nk::TensorRef sum = ref("sum");
  const nk::TensorRef y = ref("y");
  check_same_bits(sum, exp_sum, "sum differs from x + residual (+ residual_bias) rounded once");
  Scratch y2 = scratch_like(y), m2 = scratch_like(ref("mean")), r2 = scratch_like(ref("rstd")),
          s2 = scratch_like(ref("scales"));
  nk::Epilogue e = epi;
  e.scales = s2.ref;
  try {
    if (kind == k_add_layer) nk::layer_norm(sum, y2.ref, normalized, ref("weight"), ref("bias"), eps, m2.ref, r2.ref, e);
    else nk::rms_norm(sum, y2.ref, normalized, ref("weight"), rms_eps, r2.ref, e);
  } catch (const std::exception& ex) {
    fail(std::string("fused add returned, but the plain norm on its sum threw: ") + ex.what());
  }
  note("  (fused oracle: the plain norm on the returned sum, into fresh outputs)\n");
  check_same_bits(y, y2.ref, "fused differs from the plain norm on sum: y");
  check_same_bits(ref("mean"), m2.ref, "fused differs from the plain norm on sum: mean");
  check_same_bits(ref("rstd"), r2.ref, "fused differs from the plain norm on sum: rstd");
  check_same_bits(ref("scales"), s2.ref, "fused differs from the plain norm on sum: scales");
}

// ---- snapshot, call, check (shared by every kind) ------------------------------
// Snapshots every allocation, makes the call, and applies oracles 1-5 (and the
// quantized-output range check); `after` runs extra checks when it returned.
int check_call(World& w, int kind, const std::function<void()>& call, bool want_finite,
               const std::function<void()>& after) {
  auto ref = [&](const char* name) -> nk::TensorRef {
    const Tensor* t = find(w, name);
    return t ? t->ref : nk::TensorRef{};
  };
  for (Alloc& a : w.allocs) {
    a.before.assign(a.mem.get(), a.mem.get() + a.bytes);
    a.out_mask.assign(a.bytes, 0);
  }
  for (const Tensor& t : w.tensors) {
    if (t.role != Role::output || !t.ref.given) continue;
    Alloc& a = w.allocs[t.alloc];
    const int es = esize(t.ref.dtype);
    for_each(t.ref, [&](unsigned char* p) {
      const std::size_t off = std::size_t(p - a.mem.get());
      for (int b = 0; b < es && off + b < a.bytes; ++b) a.out_mask[off + b] = 1;
    });
  }

  const nk::TensorRef x = ref("x");
  bool threw = false;
  try {
    call();
  } catch (const nk::Error& e) {
    threw = true;
    if (g_verbose) std::fprintf(stderr, "  -> normkit::Error: %s\n", e.what());
    if (std::strlen(e.what()) == 0) fail("normkit::Error with an empty message");
    if (!names_an_argument(w, e.what())) fail(std::string("normkit::Error that does not start with an argument's name: ") + e.what());
  } catch (const std::exception& e) {
    fail(std::string("exception that is not normkit::Error: ") + e.what());
  } catch (...) {
    fail("exception of an unknown type");
  }
  if (g_verbose && !threw) std::fprintf(stderr, "  -> returned\n");

  // Which tensor owns a changed byte (for the message).
  auto owner = [&](int alloc, std::size_t off) {
    std::string names;
    for (const Tensor& t : w.tensors) {
      if (t.alloc != alloc || !t.ref.given) continue;
      bool hit = false;
      const int es = esize(t.ref.dtype);
      for_each(t.ref, [&](unsigned char* p) {
        const std::size_t o = std::size_t(p - w.allocs[alloc].mem.get());
        hit = hit || (off >= o && off < o + std::size_t(es));
      });
      if (hit) names += (names.empty() ? "" : ", ") + t.name;
    }
    return names.empty() ? std::string("bytes outside every view (padding)") : names;
  };
  for (std::size_t ai = 0; ai < w.allocs.size(); ++ai) {
    const Alloc& a = w.allocs[ai];
    for (std::size_t b = 0; b < a.bytes; ++b) {
      if (a.mem[b] == a.before[b]) continue;
      if (threw) fail("normkit::Error thrown after writing memory: " + owner(int(ai), b) + " changed");
      if (!a.out_mask[b]) fail("input modified / write outside the outputs' elements: " + owner(int(ai), b));
    }
  }
  if (!threw) {
    check_quantized_range(w);
    after();
    check_in_place_matches_out_of_place(w, call);
  }
  // Known normkit bugs (reported; see the list at known_issue()): skipped
  // unless NORMKIT_FUZZ_STRICT=1, so a run stays useful until they are fixed.
  const char* known = threw ? nullptr : known_issue(kind, x, ref("style"));
  if (known && !g_strict) {
    if (g_verbose) std::fprintf(stderr, "  (known issue, finiteness not checked: %s)\n", known);
    return 0;
  }
  if (!threw && want_finite) {
    for (const Tensor& t : w.tensors) {
      if (t.role != Role::output || !t.ref.given) continue;
      std::int64_t k = 0, bad = -1;
      double bad_v = 0;
      for_each(t.ref, [&](unsigned char* p) {
        const double v = load(p, t.ref.dtype);
        if (bad < 0 && !std::isfinite(v)) { bad = k; bad_v = v; }
        ++k;
      });
      if (bad >= 0) {
        char msg[256];
        std::snprintf(msg, sizeof msg, "non-finite output for finite input: %s element %" PRId64 " (logical order) is %g",
                      t.name.c_str(), bad, bad_v);
        fail(msg);
      }
    }
  }
  return 0;
}

// ---- fold_batch_norm ----------------------------------------------------------------
// weight of rank 1..5 (the decoded shape's leading dims), transpose or not,
// groups valid or not; bias / BN vectors right or wrong (decode_param);
// folded_weight / folded_bias separate, in place (weight / bias themselves),
// or overlapping where that is not allowed. Oracles 1-4, oracle 5 for the in
// place forms, and the exact values: computed in double as fused.hpp states
// (a = bn_weight / sqrt(running_var + eps); weight * a; (bias - mean) * a +
// bn_bias), rounded once to weight's dtype (float32 / float64 bit for bit; a
// 16-bit result within one unit of the double's nearest float rounding).
int run_fold(Bytes& in, World& w, nk::DType xd, const nk::Dims& decoded) {
  nk::Dims shape;
  const int rank = 1 + in.below(5);
  for (int i = 0; i < rank; ++i) shape.push_back(i < decoded.size() ? decoded[i] : 1 + in.below(2));
  const bool transpose = in.chance(64);
  const std::int64_t d0 = shape[0], d1 = rank > 1 ? shape[1] : 1;
  const std::int64_t gtable[] = {1, 1, 1, 2, 3, 4, d0, 0, -1, d0 + 1, std::numeric_limits<std::int64_t>::max(),
                                 std::numeric_limits<std::int64_t>::min()};
  const std::int64_t groups = in.pick(gtable);
  const bool groups_ok = groups > 0 && d0 % groups == 0;
  const std::int64_t C = transpose ? (groups_ok && d1 <= 4096 / std::max<std::int64_t>(groups, 1) ? d1 * groups : d1) : d0;
  note("  transpose %d, groups %" PRId64 ", C_out %" PRId64 "\n", int(transpose), groups, C);
  make_tensor(w, in, "weight", xd, shape, in.chance(220) ? st_contiguous : in.below(kStrideCount), Role::input,
              decode_gen(in));
  const nk::DType bd = is16(xd) && in.chance(128) ? nk::DType::float32 : xd;  // the BN vectors' dtype
  make_param(w, in, "bias", decode_param(in, nk::Dims{C}, xd, 64), Role::input, decode_gen(in));
  make_param(w, in, "running_mean", decode_param(in, nk::Dims{C}, bd, 12), Role::input, decode_gen(in));
  make_param(w, in, "running_var", decode_param(in, nk::Dims{C}, bd, 12), Role::input,
             in.chance(200) ? int(gen_positive) : decode_gen(in));
  make_param(w, in, "bn_weight", decode_param(in, nk::Dims{C}, bd, 64), Role::input, decode_gen(in));
  make_param(w, in, "bn_bias", decode_param(in, nk::Dims{C}, bd, 64), Role::input, decode_gen(in));
  const double eps = decode_eps(in);
  note("  eps %.17g\n", eps);
  Tensor t;
  const int fm = in.below(16);
  if (!(fm < 4 && make_aliased(w, in, "folded_weight", *find(w, "weight"), 0, t)) &&
      !(fm == 4 && make_aliased(w, in, "folded_weight", *find(w, "weight"), 1 + in.below(2), t))) {
    nk::Dims fs = shape;
    if (fm == 6) fs[in.below(rank)] += 1;
    make_tensor(w, in, "folded_weight", fm == 5 ? in.pick(kDTypes) : xd, fs,
                in.chance(230) ? st_contiguous : in.below(kStrideCount), Role::output, -1);
  }
  const int fb = in.below(16);
  const Tensor bias = *find(w, "bias");
  if (!(fb < 3 && bias.ref.given && make_aliased(w, in, "folded_bias", bias, 0, t)) &&
      !(fb == 3 && make_aliased(w, in, "folded_bias", *find(w, "weight"), 1, t))) {
    make_param(w, in, "folded_bias", decode_param(in, nk::Dims{C}, xd, fb == 4 ? 255 : 0), Role::output, -1);
  }
  auto ref = [&](const char* name) -> nk::TensorRef {
    const Tensor* p = find(w, name);
    return p ? p->ref : nk::TensorRef{};
  };

  // Finite outputs: finite inputs, min(running_var) + eps > 0, and a = |bn_weight| / sqrt of that bounded.
  bool inputs_finite = std::isfinite(eps);
  for (const Tensor& x : w.tensors)
    if (x.role == Role::input && x.ref.given) inputs_finite = inputs_finite && all_finite(x.ref);
  const nk::TensorRef rv = ref("running_var"), bnw = ref("bn_weight");
  const double lo = rv.given ? min_val(rv) + eps : -1;
  Bounds bounds;
  bounds.acc_x = nk::DType::float64;
  bounds.total = 1;
  bounds.need(rv.given && lo > 0);
  const double A = (bnw.given ? max_abs(bnw) : 1.0) / std::sqrt(std::max(lo, 0.0));
  bounds.out(max_abs(ref("weight")) * A, xd);
  bounds.out((max_abs(ref("bias")) + max_abs(ref("running_mean"))) * A + max_abs(ref("bn_bias")), xd);
  const bool want_finite = inputs_finite && bounds.ok;
  note("  inputs finite: %s; finite outputs required: %s\n", inputs_finite ? "yes" : "no", want_finite ? "yes" : "no");

  // The expected values, from the inputs before the call (the outputs may be them).
  std::vector<double> a_c, shift_c, fw;
  const nk::TensorRef wt = ref("weight");
  if (rv.given && rv.numel() == C && ref("running_mean").given && ref("running_mean").numel() == C) {
    std::vector<double> rvv, rmv, bnwv, bnbv, bv;
    for_each(rv, [&](unsigned char* p) { rvv.push_back(load(p, rv.dtype)); });
    for_each(ref("running_mean"), [&](unsigned char* p) { rmv.push_back(load(p, ref("running_mean").dtype)); });
    for_each(bnw, [&](unsigned char* p) { bnwv.push_back(load(p, bnw.dtype)); });
    for_each(ref("bn_bias"), [&](unsigned char* p) { bnbv.push_back(load(p, ref("bn_bias").dtype)); });
    for_each(ref("bias"), [&](unsigned char* p) { bv.push_back(load(p, ref("bias").dtype)); });
    for (std::int64_t c = 0; c < C; ++c) {
      const double a = (c < std::int64_t(bnwv.size()) ? bnwv[c] : 1.0) / std::sqrt(rvv[c] + eps);
      a_c.push_back(a);
      shift_c.push_back(((c < std::int64_t(bv.size()) ? bv[c] : 0.0) - rmv[c]) * a +
                        (c < std::int64_t(bnbv.size()) ? bnbv[c] : 0.0));
    }
    // Per weight element (logical order): its output channel.
    const std::int64_t n = wt.numel();
    const std::int64_t inner = rank > 1 ? n / std::max<std::int64_t>(d0 * d1, 1) : 1;
    for (std::int64_t k = 0; k < n && groups_ok; ++k) {
      const std::int64_t i0 = k / std::max<std::int64_t>(d1 * inner, 1), i1 = (k / inner) % d1;
      const std::int64_t c = transpose ? (i0 / (d0 / groups)) * d1 + i1 : i0;
      fw.push_back(c < C ? c : -1);
    }
  }
  std::vector<double> wv;
  for_each(wt, [&](unsigned char* p) { wv.push_back(load(p, wt.dtype)); });

  auto call = [&] {
    nk::fold_batch_norm(ref("weight"), ref("bias"), ref("running_mean"), ref("running_var"), eps, ref("bn_weight"),
                        ref("bn_bias"), ref("folded_weight"), ref("folded_bias"), transpose, groups);
  };
  auto after = [&] {
    if (a_c.empty() && C > 0) fail("fold_batch_norm returned without running statistics of C_out elements");
    auto expect = [&](const nk::TensorRef& out, const std::vector<double>& want, const char* name) {
      std::size_t k = 0;
      for_each(out, [&](unsigned char* p) {
        if (k >= want.size()) return;
        const double v = want[k++];
        unsigned char e[8];
        store(e, out.dtype, out.dtype == nk::DType::float32 ? round_to_float(v) : v);
        if (std::memcmp(e, p, esize(out.dtype)) == 0) return;
        const double got = load(p, out.dtype);
        if (std::isnan(got) && std::isnan(v)) return;
        if (is16(out.dtype)) {  // correct rounding vs this double -> float -> 16-bit: one unit apart at most
          std::uint16_t g16, e16;
          std::memcpy(&g16, p, 2);
          std::memcpy(&e16, e, 2);
          if ((g16 ^ e16) < 0x8000 && (g16 > e16 ? g16 - e16 : e16 - g16) <= 1) return;
        }
        char msg[300];
        std::snprintf(msg, sizeof msg, "fold_batch_norm: %s element %zu (logical order) is %.17g, expected %.17g",
                      name, k - 1, got, v);
        fail(msg);
      });
    };
    std::vector<double> want_w;
    for (std::size_t k = 0; k < fw.size() && k < wv.size(); ++k) want_w.push_back(fw[k] >= 0 ? wv[k] * a_c[std::size_t(fw[k])] : NAN);
    expect(ref("folded_weight"), want_w, "folded_weight");
    expect(ref("folded_bias"), shift_c, "folded_bias");
  };
  return check_call(w, k_fold, call, want_finite, after);
}

int run_one(const std::uint8_t* data, std::size_t size) {
  Bytes in{data, size};
  World w;
  g_desc.clear();

  const int kind = in.below(kKindCount);
  const nk::DType xd = in.pick(kDTypes);
  const nk::Dims shape = decode_shape(in);
  w.rng.s = in.u64();
  const auto& paths = kernel_paths();
  const std::string path = paths.empty() ? std::string() : paths[in.below(int(paths.size()))];
  if (!path.empty()) nk::set_kernel_path(path);
  note("call %s, x dtype %s, kernel path %s\n", kKindNames[kind], nk::to_string(xd), path.c_str());

  if (kind == k_fold) return run_fold(in, w, xd, shape);
  const bool is_add = kind == k_add_layer || kind == k_add_rms;
  const bool is_rms = kind == k_rms || kind == k_add_rms;  // a forward RMSNorm
  const bool is_rows = kind == k_layer || kind == k_rms || kind == k_layer_bw || kind == k_rms_bw || is_add;
  const bool backward = is_backward_kind(kind);
  const nk::DType sd = nk::stats_dtype(xd);

  // x: channel norms need it contiguous, so mostly contiguous there.
  const int x_stride = is_rows ? (in.chance(128) ? st_contiguous : in.below(kStrideCount))
                               : (in.chance(200) ? st_contiguous : in.below(kStrideCount));
  const int x_gen = decode_gen(in);
  make_tensor(w, in, "x", xd, shape, x_stride, Role::input, x_gen, in.chance(20));

  // Norm-specific arguments.
  std::optional<nk::Layout> layout;
  nk::Dims normalized;
  int k_norm = 0;
  Geometry geo;
  if (is_rows) {
    const int rank = shape.size();
    k_norm = rank > 0 ? 1 + in.below(rank) : 1;
    for (int i = rank - k_norm; i < rank; ++i) normalized.push_back(i >= 0 ? shape[i] : 1);
    switch (in.below(24)) {  // sometimes wrong
      case 0: normalized = nk::Dims{}; break;
      case 1: if (normalized.size() > 0) normalized[0] += 1; break;
      case 2: if (normalized.size() < nk::kMaxRank) { nk::Dims d{1}; for (auto v : normalized) d.push_back(v); normalized = d; } break;
      case 3: if (normalized.size() > 0) normalized[0] = -normalized[0] - 1; break;
      default: break;
    }
    note("  normalized_shape %s\n", dims_str(normalized).c_str());
  } else {
    layout = decode_layout(in, shape.size());
    geo = geometry_of(shape, layout);
    note("  layout %s\n", layout_str(layout).c_str());
  }
  const std::int64_t C = geo.ok ? geo.c : (shape.size() > 1 ? shape[1] : 1);
  const std::int64_t N = geo.ok ? geo.n : (shape.size() > 0 ? shape[0] : 1);
  const std::int64_t R_rows = [&] {  // rows of a rows norm
    std::int64_t r = 1;
    for (int i = 0; i < shape.size() - k_norm; ++i) r *= shape[i];
    return r;
  }();
  double eps = decode_eps(in);
  std::optional<double> rms_eps = eps;
  if (is_rms && in.chance(64)) rms_eps = std::nullopt;
  note("  eps %.17g%s\n", eps, (is_rms && !rms_eps) ? " (nullopt: machine epsilon)" : "");
  double momentum = 0.1;
  std::int64_t num_groups = 1;
  if (kind == k_group || kind == k_group_bw) {
    const std::int64_t half = C % 2 == 0 ? C / 2 : C;
    const std::int64_t table[] = {C, 1, half, 0, -1, C + 1, 3, 2, 4, std::numeric_limits<std::int64_t>::max(),
                                  std::numeric_limits<std::int64_t>::min(), C, 1};
    num_groups = in.pick(table);
    note("  num_groups %" PRId64 "\n", num_groups);
  }
  if (kind == k_bn_train || kind == k_in_input || kind == k_bn_eval || kind == k_in_running) {
    momentum = decode_momentum(in);
    note("  momentum %.17g\n", momentum);
  }

  // The epilogue of a forward (normkit/fused.hpp): usually none; an
  // activation (sometimes not an enumerator); a quantized y (int8 /
  // float8_e4m3, y then of that dtype, sometimes not) with a static scale
  // (finite, 0, negative, NaN, inf) or dynamic per-row scales (the "scales"
  // output, made with the statistics below: given or not, right or wrong).
  nk::Epilogue epi;
  nk::DType y_dtype = xd;  // the right dtype of y
  if (!backward) {
    const int a = in.below(16);
    epi.activation = a < 8 ? nk::Activation::none
                     : a < 15 ? static_cast<nk::Activation>(1 + (a - 8) % 4)
                              : static_cast<nk::Activation>(5 + in.below(251));  // not an enumerator
    const int q = in.below(16);
    epi.quantize = q < 10 ? nk::Quantize::none : q < 13 ? nk::Quantize::int8
                   : q < 15 ? nk::Quantize::float8_e4m3 : static_cast<nk::Quantize>(3 + in.below(253));
    const double scales_table[] = {1.0, 0.02, 1.0 / 127, 3.5, 1e-30, 1e30, 0.0, -0.0, -1.0, NAN, INFINITY, -INFINITY};
    if (in.chance(epi.quantize == nk::Quantize::none ? 8 : 128)) epi.scale = in.pick(scales_table);
    if (epi.quantize == nk::Quantize::int8) y_dtype = nk::DType::int8;
    if (epi.quantize == nk::Quantize::float8_e4m3) y_dtype = nk::DType::float8_e4m3;
    if (in.chance(12)) y_dtype = in.chance(128) ? nk::DType::int8 : nk::DType::float8_e4m3;  // maybe wrong
    if (in.chance(8)) y_dtype = xd;
    char scale_str[40] = "not given";
    if (epi.scale) std::snprintf(scale_str, sizeof scale_str, "%.17g", *epi.scale);
    note("  epilogue: activation %d, quantize %d, scale %s; y dtype %s\n", int(epi.activation), int(epi.quantize),
         scale_str, nk::to_string(y_dtype));
  }
  const bool quantized = epi.quantize == nk::Quantize::int8 || epi.quantize == nk::Quantize::float8_e4m3;

  // The output (y / dx): separate, or aliasing x (or dy).
  const int out_alias = in.below(16);  // 0: exactly, 1: shifted, 2: other strides; else separate
  const int out_kind = in.below(16);   // 0: wrong dtype, 1: wrong shape; else right
  auto make_output = [&](const std::string& name, const Tensor& alias_of) {
    const nk::DType od = out_kind == 0 ? in.pick(kDTypes) : (name == "y" ? y_dtype : xd);
    nk::Dims os = shape;
    if (out_kind == 1 && os.size() > 0) os[in.below(os.size())] += 1;
    if (out_alias < 3 && od == xd && os == shape) {
      Tensor t;
      if (make_aliased(w, in, name, alias_of, out_alias, t)) return;
    }
    const int mode = in.chance(170) ? st_contiguous : in.below(kStrideCount);
    make_tensor(w, in, name, od, os, mode, Role::output, -1);
  };

  const nk::Dims param_shape = is_rows ? (normalized.size() > 0 ? normalized : nk::Dims{1}) : nk::Dims{C};
  auto param_dtype_choice = [&](Bytes& b) { return (is16(xd) && b.chance(128)) ? nk::DType::float32 : xd; };

  // Arguments, by kind. TensorRefs are looked up by name after all tensors exist
  // (make_aliased may re-home x).
  if (!backward) {
    // y
    make_output("y", w.tensors[0]);
    // weight / bias (one dtype for both), or style.
    if (kind != k_adain_map && kind != k_adain_stats) {
      const nk::DType pd = param_dtype_choice(in);
      make_param(w, in, "weight", decode_param(in, param_shape, pd, 100), Role::input, decode_gen(in));
      if (!is_rms) make_param(w, in, "bias", decode_param(in, param_shape, pd, 100), Role::input, decode_gen(in));
      if (is_add) make_residual_and_sum(w, in, shape, param_shape, pd);
    } else if (kind == k_adain_map) {
      nk::Dims ss = shape;
      if (geo.ok) {
        const std::int64_t sp[] = {1, 2, 3, 4, 0, 5};
        for (int i = 1; i < ss.size(); ++i)
          if (i != geo.caxis) ss[i] = in.pick(sp);
      }
      if (in.chance(12) && ss.size() > 0) ss[0] += 1;
      const nk::DType styd = in.chance(12) ? in.pick(kDTypes) : xd;
      make_tensor(w, in, "style", styd, ss, in.chance(220) ? st_contiguous : in.below(kStrideCount), Role::input,
                  decode_gen(in));
    } else {
      const nk::DType pd = in.chance(128) ? nk::DType::float32 : xd;
      make_param(w, in, "style_mean", decode_param(in, nk::Dims{N, C}, pd, 8), Role::input, decode_gen(in));
      make_param(w, in, "style_std", decode_param(in, nk::Dims{N, C}, pd, 8), Role::input, decode_gen(in));
    }
    // Running statistics.
    const bool trains = kind == k_bn_train || kind == k_in_input;
    if (kind == k_bn_train || kind == k_bn_eval || kind == k_in_input || kind == k_in_running) {
      const nk::DType rd = in.chance(128) ? nk::DType::float32 : xd;
      const int absent = (kind == k_bn_eval || kind == k_in_running) ? 12 : 100;
      const ParamChoice rm = decode_param(in, nk::Dims{C}, rd, absent);
      ParamChoice rv = rm;
      if (in.chance(16)) rv = decode_param(in, nk::Dims{C}, rd, absent);
      make_param(w, in, "running_mean", rm, trains ? Role::output : Role::input, decode_gen(in));
      make_param(w, in, "running_var", rv, trains ? Role::output : Role::input,
                 in.chance(200) ? int(gen_positive) : decode_gen(in));
    }
    // Statistics outputs.
    if (kind != k_adain_map && kind != k_adain_stats) {
      std::int64_t count = R_rows;
      if (kind == k_bn_train || kind == k_bn_eval) count = C;
      if (kind == k_in_input || kind == k_in_running) count = N * C;
      if (kind == k_group) count = N * std::max<std::int64_t>(std::min<std::int64_t>(num_groups, 64), 0);
      nk::Dims cs{count};
      if (is_rows && in.chance(64)) {  // x.shape[:-k] + (1,)*k, as Python returns them
        cs = nk::Dims{};
        for (int i = 0; i < shape.size(); ++i) cs.push_back(i < shape.size() - k_norm ? shape[i] : 1);
      }
      if (!is_rms) {
        Tensor& m = make_param(w, in, "mean", decode_param(in, cs, sd, 128), Role::output, -1);
        m.stats_out = true;
      }
      Tensor& r = make_param(w, in, "rstd", decode_param(in, cs, sd, 128), Role::output, -1);
      r.stats_out = true;
    }
    // Dynamic quantization scales: float32, one per row; needed exactly when
    // a rows norm quantizes without a static scale.
    const bool wants_scales = quantized && !epi.scale && is_rows;
    make_param(w, in, "scales", decode_param(in, nk::Dims{R_rows}, nk::DType::float32, wants_scales ? 12 : 240),
               Role::output, -1);
  } else {
    // dy: like x, sometimes x itself (an input alias, legitimate).
    const int dy_mode = in.below(16);
    if (dy_mode == 0) {
      Tensor t = w.tensors[0];
      t.name = "dy";
      w.tensors.push_back(t);
      note("  %-12s = x (same view)\n", "dy");
    } else {
      const nk::DType dyd = dy_mode == 1 ? in.pick(kDTypes) : xd;
      nk::Dims dys = shape;
      if (dy_mode == 2 && dys.size() > 0) dys[0] += 1;
      make_tensor(w, in, "dy", dyd, dys, is_rows ? (in.chance(128) ? st_contiguous : in.below(kStrideCount))
                                                 : (in.chance(220) ? st_contiguous : in.below(kStrideCount)),
                  Role::input, decode_gen(in));
    }
    // Statistics from the forward (consistent) or from the bytes.
    const bool consistent = in.chance(150);
    std::int64_t count = R_rows;
    if (kind == k_bn_train_bw || kind == k_bn_eval_bw) count = C;
    if (kind == k_in_input_bw || kind == k_in_running_bw) count = N * C;
    if (kind == k_group_bw) count = N * std::max<std::int64_t>(std::min<std::int64_t>(num_groups, 64), 0);
    const nk::DType pd = param_dtype_choice(in);
    if (kind != k_adain_map_bw && kind != k_adain_stats_bw) {
      if (kind != k_rms_bw) make_param(w, in, "mean", decode_param(in, nk::Dims{count}, sd, 8), Role::input, decode_gen(in));
      make_param(w, in, "rstd", decode_param(in, nk::Dims{count}, sd, 8), Role::input,
                 in.chance(200) ? int(gen_positive) : decode_gen(in));
      make_param(w, in, "weight", decode_param(in, param_shape, pd, 100), Role::input, decode_gen(in));
    } else if (kind == k_adain_map_bw) {
      nk::Dims ss = shape;
      if (geo.ok) {
        const std::int64_t sp[] = {1, 2, 3, 4, 0, 5};
        for (int i = 1; i < ss.size(); ++i)
          if (i != geo.caxis) ss[i] = in.pick(sp);
      }
      make_tensor(w, in, "style", in.chance(12) ? in.pick(kDTypes) : xd, ss,
                  in.chance(220) ? st_contiguous : in.below(kStrideCount), Role::input, decode_gen(in));
    } else {
      const nk::DType spd = in.chance(128) ? nk::DType::float32 : xd;
      make_param(w, in, "style_mean", decode_param(in, nk::Dims{N, C}, spd, 8), Role::input, decode_gen(in));
      make_param(w, in, "style_std", decode_param(in, nk::Dims{N, C}, spd, 8), Role::input, decode_gen(in));
    }
    // dx: separate, or x / dy itself, or overlapping one of them.
    const bool alias_dy = in.chance(128);
    make_output("dx", *find(w, alias_dy ? "dy" : "x"));
    // Optional parameter-gradient outputs.
    if (kind == k_adain_map_bw) {
      const Tensor* st = find(w, "style");
      if (in.chance(128)) make_tensor(w, in, "dstyle", st->ref.dtype, st->ref.shape, st_contiguous, Role::output, -1);
      else not_given(w, "dstyle");
    } else if (kind == k_adain_stats_bw) {
      const Tensor* sm = find(w, "style_mean");
      const nk::DType spd = sm->ref.given ? sm->ref.dtype : xd;
      make_param(w, in, "dstyle_mean", decode_param(in, nk::Dims{N, C}, spd, 128), Role::output, -1);
      make_param(w, in, "dstyle_std", decode_param(in, nk::Dims{N, C}, spd, 128), Role::output, -1);
    } else {
      const Tensor* wt = find(w, "weight");
      const nk::DType gd = wt->ref.given ? wt->ref.dtype : pd;
      make_param(w, in, "dweight", decode_param(in, param_shape, gd, 128), Role::output, -1);
      if (kind != k_rms_bw) make_param(w, in, "dbias", decode_param(in, param_shape, gd, 128), Role::output, -1);
    }
    // Consistent statistics: run the forward into scratch (if it accepts).
    Tensor* mean_t = find(w, "mean");
    Tensor* rstd_t = find(w, "rstd");
    if (consistent && rstd_t && rstd_t->ref.given) {
      const nk::TensorRef& x = find(w, "x")->ref;
      std::vector<unsigned char> scratch(std::size_t(std::max<std::int64_t>(x.numel(), 0)) * esize(xd) + 1);
      nk::TensorRef y(scratch.data(), xd, x.shape, nk::contiguous_strides(x.shape));
      const nk::TensorRef m = mean_t ? mean_t->ref : nk::TensorRef{};
      const nk::TensorRef& r = rstd_t->ref;
      const double feps = std::isfinite(eps) && eps >= 0 ? eps : 1e-5;
      try {
        switch (kind) {
          case k_layer_bw: nk::layer_norm(x, y, normalized, {}, {}, feps, m, r); break;
          case k_rms_bw: nk::rms_norm(x, y, normalized, {}, feps, r); break;
          case k_bn_train_bw: nk::batch_norm(x, y, {}, {}, {}, {}, true, 0.1, feps, layout, m, r); break;
          case k_in_input_bw: nk::instance_norm(x, y, {}, {}, {}, {}, true, 0.1, feps, layout, m, r); break;
          case k_group_bw: nk::group_norm(x, y, num_groups, {}, {}, feps, layout, m, r); break;
          default: break;
        }
        note("  (mean/rstd given to the backward: what the forward wrote, eps %.17g)\n", feps);
      } catch (const nk::Error&) {
        // keep the generated values
      }
    }
  }

  // ---- the rule for finite outputs, from the inputs as they are now ----------------
  const Tensor& X = *find(w, "x");
  auto ref = [&](const char* name) -> nk::TensorRef {
    const Tensor* t = find(w, name);
    return t ? t->ref : nk::TensorRef{};
  };
  bool inputs_finite = true;
  for (const Tensor& t : w.tensors)
    if (t.role == Role::input && t.ref.given) inputs_finite = inputs_finite && all_finite(t.ref);
  // The add kinds normalize s = x + residual (+ residual_bias) as stored in
  // x's dtype: computed here from the inputs before the call (sum may be x or
  // residual), for the fused oracle and as the statistics' data below.
  std::vector<unsigned char> exp_sum;
  nk::TensorRef exp_sum_ref;
  const bool exp_ok = is_add && expected_sum(w, normalized, exp_sum, exp_sum_ref);
  const nk::TensorRef stats_x = is_add ? exp_sum_ref : X.ref;
  // Running statistics are read in training too (the update).
  for (const char* name : {"running_mean", "running_var"})
    if (const Tensor* t = find(w, name); t && t->ref.given) inputs_finite = inputs_finite && all_finite(t->ref);

  g_rstd_max = 0;
  Bounds bounds;
  bounds.acc_x = xd;
  bounds.total = X.ref.numel();
  bool want_finite = inputs_finite && X.ref.numel() > 0;
  // eps must be a number of the accumulation type (float for float32 and
  // 16-bit x): normkit accepts any finite double, but eps > FLT_MAX is no float.
  bounds.need(std::isfinite(round_to_acc(eps, xd)));
  if (want_finite) {
    bounds.need(!is_add || exp_ok);
    const double Xm = max_abs(stats_x);
    const double D = backward ? max_abs(ref("dy")) : 0;
    const nk::TensorRef wt = ref("weight"), bs = ref("bias");
    const double W = wt.given ? max_abs(wt) : 1.0, B = bs.given ? max_abs(bs) : 0.0;
    const nk::DType pdt = wt.given ? wt.dtype : xd;
    // Statistics groups of x.
    std::int64_t groups = 0;
    std::function<std::int64_t(const std::int64_t*)> group_of;
    std::int64_t M = 1;
    if (is_rows) {
      const int rank = shape.size();
      const int lead = rank - std::min<int>(normalized.size(), rank);
      groups = 1;
      for (int i = 0; i < lead; ++i) groups *= shape[i];
      group_of = [&shape, lead](const std::int64_t* idx) {
        std::int64_t r = 0;
        for (int i = 0; i < lead; ++i) r = r * shape[i] + idx[i];
        return r;
      };
    } else if (geo.ok) {
      const Geometry g = geo;
      std::int64_t G = 1;
      bool per_sample = true;
      if (kind == k_bn_train || kind == k_bn_train_bw || kind == k_bn_eval || kind == k_bn_eval_bw) per_sample = false;
      if (kind == k_group || kind == k_group_bw) G = num_groups > 0 && num_groups <= g.c ? num_groups : 1;
      else G = g.c;
      groups = per_sample ? g.n * G : g.c;
      const std::int64_t per = G > 0 && g.c % G == 0 ? g.c / G : 1;
      group_of = [g, per, G, per_sample](const std::int64_t* idx) {
        const std::int64_t c = idx[g.caxis];
        return per_sample ? idx[0] * G + c / per : c;
      };
    }
    std::vector<GroupSummary> sums;
    bounds.need(bool(group_of));
    if (group_of && (!is_add || exp_ok)) sums = summarize(stats_x, groups, group_of);
    bounds.need(!sums.empty());
    for (const auto& s : sums) M = std::max(M, s.count);
    const RstdBound rb = data_rstd_bound(sums, eps, xd, is_rms || kind == k_rms_bw);
    const nk::DType acc_dt = xd == nk::DType::float64 ? xd : nk::DType::float32;
    for (double factor : {Xm, D, W, B}) bounds.out(factor, acc_dt);
    auto need_out = [&](const char* name, double v) {
      const nk::TensorRef t = ref(name);
      if (t.given) bounds.out(v, t.dtype);
    };
    switch (kind) {
      case k_layer: case k_rms: case k_bn_train: case k_in_input: case k_group: case k_add_layer: case k_add_rms: {
        const double e = (is_rms && !rms_eps) ? nk::machine_epsilon(xd) : eps;
        const RstdBound r = data_rstd_bound(sums, e, xd, is_rms);
        if (is_add) bounds.out(Xm, xd);  // sum (Xm: of the expected sum)
        bounds.need(r.ok);
        bounds.out(4 * Xm * Xm * double(M), xd == nk::DType::float64 ? xd : nk::DType::float32);  // sums of squares
        bounds.out(r.xh * W + B, xd);
        bounds.out(r.r * W, acc_dt);  // kernels fold weight * rstd
        // Dynamic scales (float32, also for float64 x): max |y| / qmax.
        need_out("scales", r.xh * W + B);
        need_out("mean", Xm);
        need_out("rstd", r.r);
        if (kind == k_bn_train || kind == k_in_input) {
          const double unb = double(M) / double(std::max<std::int64_t>(M - 1, 1));
          const double rmax = std::max(max_abs(ref("running_mean")), max_abs(ref("running_var")));
          const double v = std::fabs(1 - momentum) * rmax + std::fabs(momentum) * std::max(Xm, 4 * Xm * Xm * unb);
          need_out("running_mean", v);
          need_out("running_var", v);
        }
        (void)pdt;
        break;
      }
      case k_bn_eval: case k_in_running: {
        const nk::TensorRef rm = ref("running_mean"), rv = ref("running_var");
        const double floor = rv.given ? min_val(rv) + eps : -1;
        bounds.need(rv.given && min_val(rv) >= 0 && floor > 0);
        const double R = floor > 0 ? 1 / std::sqrt(floor) : INFINITY;
        const double RM = rm.given ? max_abs(rm) : 0;
        bounds.out((Xm + RM) * W * R + B, xd);
        bounds.out(W * R * (1 + RM) + B, xd == nk::DType::float64 ? xd : nk::DType::float32);  // folded tables
        need_out("mean", RM);
        need_out("rstd", R);
        break;
      }
      case k_adain_map: case k_adain_stats: {
        bounds.need(rb.ok);
        double SS, SM;
        if (kind == k_adain_map) {
          const double S = max_abs(ref("style"));
          SS = 2 * S + std::sqrt(std::max(eps, 0.0));
          SM = S;
          bounds.out(4 * S * S * double(std::max<std::int64_t>(ref("style").numel(), 1)),
                     xd == nk::DType::float64 ? xd : nk::DType::float32);
        } else {
          SS = max_abs(ref("style_std"));
          SM = max_abs(ref("style_mean"));
        }
        bounds.out(4 * Xm * Xm * double(M), xd == nk::DType::float64 ? xd : nk::DType::float32);
        bounds.out(SS, acc_dt);
        bounds.out(rb.r, acc_dt);
        bounds.out(rb.xh * SS + SM, xd);
        bounds.out(rb.r * SS, acc_dt);  // style_std * rstd, folded
        break;
      }
      case k_layer_bw: case k_rms_bw: case k_bn_train_bw: case k_in_input_bw: case k_group_bw:
      case k_bn_eval_bw: case k_in_running_bw: {
        const double Rs = max_abs(ref("rstd"));
        g_rstd_max = Rs;
        const double Mx = max_abs(ref("mean"));
        const double xc = 3 * Xm + Mx;
        const double xh = xc * Rs;
        const double g = D * W;
        bounds.out(Rs * W, acc_dt);  // weight * rstd, folded
        // sum(x - mean) over a group, in the accumulation type (it refines the
        // saved mean; it needs no dy, so dy = 0 does not excuse it).
        bounds.out(xc, acc_dt);
        // xhat = (x - mean) * rstd, formed first in the accumulation type: a
        // zero dy or weight does not excuse it either (0 * inf is NaN).
        bounds.out(xh, acc_dt);
        const bool constant_stats = kind == k_bn_eval_bw || kind == k_in_running_bw;
        const double dx = constant_stats ? g * Rs : Rs * (2 * g + xh * g * xh) + Rs * Rs * xc * g * xh;
        // Elements summed into one weight-gradient entry.
        const double rows = double(std::max<std::int64_t>(bounds.total, 1));
        bounds.out(dx, xd);
        bounds.out(xc * xc * D * (W + 1) * double(M), xd == nk::DType::float64 ? xd : nk::DType::float32);
        need_out("dweight", rows * D * xh);
        need_out("dbias", rows * D);
        (void)pdt;
        break;
      }
      case k_adain_map_bw: case k_adain_stats_bw: {
        bounds.need(rb.ok);
        double SS;
        double Rstyle = 0, Smax = 0;
        std::int64_t S = 1;
        if (kind == k_adain_map_bw) {
          const nk::TensorRef st = ref("style");
          Smax = max_abs(st);
          SS = 2 * Smax + std::sqrt(std::max(eps, 0.0));
          const Geometry gs = geometry_of(st.shape, layout);
          S = gs.ok ? std::max<std::int64_t>(gs.s, 1) : 1;
          // 1 / style_std from the style's groups, as rstd from x's.
          if (gs.ok && find(w, "dstyle")->ref.given) {
            const std::int64_t stride_c = gs.c;
            auto sg = summarize(st, gs.n * gs.c, [gs, stride_c](const std::int64_t* idx) {
              return idx[0] * stride_c + idx[gs.caxis];
            });
            const RstdBound sb = data_rstd_bound(sg, eps, xd, false);
            bounds.need(sb.ok);
            Rstyle = sb.r;
          }
          bounds.out(4 * Smax * Smax * double(std::max<std::int64_t>(st.numel(), 1)),
                     xd == nk::DType::float64 ? xd : nk::DType::float32);
        } else {
          SS = max_abs(ref("style_std"));
        }
        bounds.out(SS, acc_dt);
        bounds.out(rb.r, acc_dt);
        const double g = D * SS;
        bounds.out(rb.r * SS, acc_dt);
        const double xh = rb.xh;
        const double R = rb.r;
        g_rstd_max = R;
        bounds.out(4 * Xm * Xm * double(M), xd == nk::DType::float64 ? xd : nk::DType::float32);
        bounds.out(R * (2 * g + xh * g * xh) + R * 3 * Xm * g * xh, xd);
        const double sum_dy = double(M) * D, sum_dy_xhat = double(M) * D * xh;
        need_out("dstyle_mean", sum_dy);
        need_out("dstyle_std", sum_dy_xhat);
        need_out("dstyle", sum_dy / double(S) + sum_dy_xhat * 3 * Smax * Rstyle / double(S));
        break;
      }
      default: break;
    }
  }
  want_finite = want_finite && bounds.ok;
  note("  inputs finite: %s; finite outputs required: %s\n", inputs_finite ? "yes" : "no", want_finite ? "yes" : "no");

  // The call, with the tensors as they are in w now (oracle 5 moves an output).
  auto call = [&] {
    const nk::TensorRef x = ref("x"), y = ref("y"), dy = ref("dy"), dx = ref("dx");
    nk::Epilogue e = epi;
    e.scales = ref("scales");
    switch (kind) {
      case k_layer: nk::layer_norm(x, y, normalized, ref("weight"), ref("bias"), eps, ref("mean"), ref("rstd"), e); break;
      case k_rms: nk::rms_norm(x, y, normalized, ref("weight"), rms_eps, ref("rstd"), e); break;
      case k_add_layer:
        nk::add_layer_norm(x, ref("residual"), y, ref("sum"), normalized, ref("weight"), ref("bias"), eps,
                           ref("residual_bias"), e, ref("mean"), ref("rstd"));
        break;
      case k_add_rms:
        nk::add_rms_norm(x, ref("residual"), y, ref("sum"), normalized, ref("weight"), rms_eps, ref("residual_bias"), e,
                         ref("rstd"));
        break;
      case k_bn_train:
      case k_bn_eval:
        nk::batch_norm(x, y, ref("running_mean"), ref("running_var"), ref("weight"), ref("bias"), kind == k_bn_train,
                       momentum, eps, layout, ref("mean"), ref("rstd"), e);
        break;
      case k_in_input:
      case k_in_running:
        nk::instance_norm(x, y, ref("running_mean"), ref("running_var"), ref("weight"), ref("bias"),
                          kind == k_in_input, momentum, eps, layout, ref("mean"), ref("rstd"), e);
        break;
      case k_group:
        nk::group_norm(x, y, num_groups, ref("weight"), ref("bias"), eps, layout, ref("mean"), ref("rstd"), e);
        break;
      case k_adain_map: nk::adaptive_instance_norm(x, y, ref("style"), eps, layout, e); break;
      case k_adain_stats: nk::adaptive_instance_norm(x, y, ref("style_mean"), ref("style_std"), eps, layout, e); break;
      case k_layer_bw:
        nk::layer_norm_backward(dy, x, ref("mean"), ref("rstd"), normalized, ref("weight"), dx, ref("dweight"),
                                ref("dbias"));
        break;
      case k_rms_bw: nk::rms_norm_backward(dy, x, ref("rstd"), normalized, ref("weight"), dx, ref("dweight")); break;
      case k_bn_train_bw:
      case k_bn_eval_bw:
        nk::batch_norm_backward(dy, x, ref("mean"), ref("rstd"), ref("weight"), dx, ref("dweight"), ref("dbias"),
                                kind == k_bn_train_bw, layout);
        break;
      case k_in_input_bw:
      case k_in_running_bw:
        nk::instance_norm_backward(dy, x, ref("mean"), ref("rstd"), ref("weight"), dx, ref("dweight"), ref("dbias"),
                                   kind == k_in_input_bw, layout);
        break;
      case k_group_bw:
        nk::group_norm_backward(dy, x, ref("mean"), ref("rstd"), num_groups, ref("weight"), dx, ref("dweight"),
                                ref("dbias"), layout);
        break;
      case k_adain_map_bw: nk::adaptive_instance_norm_backward(dy, x, ref("style"), eps, dx, ref("dstyle"), layout); break;
      case k_adain_stats_bw:
        nk::adaptive_instance_norm_backward(dy, x, ref("style_mean"), ref("style_std"), eps, dx, ref("dstyle_mean"),
                                            ref("dstyle_std"), layout);
        break;
    }
  };
  // After a call that returned: the fused add equals the unfused norm on its sum.
  auto after = [&] {
    if (is_add) check_fused_equals_unfused(w, kind, normalized, eps, rms_eps, epi, exp_sum_ref, exp_ok);
  };
  return check_call(w, kind, call, want_finite, after);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* v = std::getenv("NORMKIT_FUZZ_VERBOSE");
  g_verbose = v && *v && *v != '0';
  const char* st = std::getenv("NORMKIT_FUZZ_STRICT");
  g_strict = st && *st && *st != '0';
  nk::set_num_threads(1);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) { return run_one(data, size); }
