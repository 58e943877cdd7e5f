// cuda/channel_kernels.cu - channel norms (BatchNorm, InstanceNorm, GroupNorm,
// AdaIN) on CUDA: statistics, folded tables, the elementwise apply, backward
// sums and tables, AdaIN's style gradient, and dtype conversion.
//
// x is [n][c][s] (channels-first) or [n][s][c] (channels-last).
// - Channels-first reductions cut each owner (a statistics group, or a
//   (sample, channel) plane) into segments of contiguous runs; a sub-warp of
//   lanes takes one segment and writes one partial.
// - Channels-last reductions use tiles of (a chunk of rows) x (channels), the
//   threads' x index over channels so a warp reads contiguous memory, rows
//   merged across threadIdx.y in a fixed tree.
// Segments, chunks and lane assignments depend on the shape only (and on
// whether 16-byte vectors apply), and partials are merged in a fixed order:
// results do not depend on the device or on scheduling; no float atomics.
// Statistics are Welford moments of x - shift, shift = one element of the
// group (the same for all its partials), so partial means stay small and the
// final merge does not lose variance to the rounding of large means.
#include <algorithm>
#include <cstdint>

#include "cuda/common.cuh"

namespace normkit::cuda_kernels {

namespace {

using i64 = std::int64_t;
using u64 = std::uint64_t;

constexpr int kThreads = 256;  // every kernel's block size
constexpr int kWarps = kThreads / 32;
constexpr i64 kTargetPartials = 4096;   // partials per owner the chunk sizes aim at
constexpr i64 kSegmentBytes = 8192;     // starting size of a channels-first segment
constexpr i64 kMaxSegmentElems = 65536; // at most 2048 elements per lane before a partial
constexpr i64 kRowsPerThread = 16;      // channels-last reductions: starting rows per thread
constexpr i64 kMaxRowsPerThread = 2048;
constexpr int kElemsPerThread = 16;     // apply: elements per thread and work item

// ---- host helpers ---------------------------------------------------------------

inline i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }

// Smallest power of two >= v, at most cap.
inline int pow2_at_least(i64 v, int cap) {
  int p = 1;
  while (p < cap && p < v) p <<= 1;
  return p;
}

// ---- device helpers ---------------------------------------------------------------

__device__ __forceinline__ i64 min64(i64 a, i64 b) { return a < b ? a : b; }

// Division by a divisor fixed for a launch (Granlund-Montgomery): multiply-high
// and shifts instead of a 64-bit division, which is a long software routine
// on the GPU. Exact for 0 <= n < 2^64, divisor >= 1.
struct FastDiv {
  u64 magic = 0;
  int shift1 = 0, shift2 = 0;
  FastDiv() = default;
  explicit FastDiv(i64 divisor) {
    const u64 d = static_cast<u64>(divisor);
    int l = 0;  // ceil(log2(d))
    while (l < 64 && (u64(1) << l) < d) ++l;
    const unsigned __int128 pow_l = static_cast<unsigned __int128>(1) << l;
    magic = static_cast<u64>(((pow_l - d) << 64) / d) + 1;
    shift1 = l < 1 ? l : 1;
    shift2 = l > 1 ? l - 1 : 0;
  }
  __device__ __forceinline__ i64 div(i64 n) const {
    const u64 un = static_cast<u64>(n);
    const u64 t = __umul64hi(un, magic);
    return static_cast<i64>((t + ((un - t) >> shift1)) >> shift2);
  }
};

// W elements: one 16-byte access when W == kVec<T>, else one scalar.
template <class T, int W>
struct Pack {
  T v[W];
};

template <int W, class T>
__device__ __forceinline__ Pack<T, W> load_pack(const T* p) {
  Pack<T, W> r;
  if constexpr (W == 1) {
    r.v[0] = *p;
  } else {
    static_assert(W == kVec<T>, "a pack is one element or 16 bytes");
    const Vec<T> v = *reinterpret_cast<const Vec<T>*>(p);
#pragma unroll
    for (int k = 0; k < W; ++k) r.v[k] = v.v[k];
  }
  return r;
}

template <int W, class T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, W>& r) {
  if constexpr (W == 1) {
    *p = r.v[0];
  } else {
    Vec<T> v;
#pragma unroll
    for (int k = 0; k < W; ++k) v.v[k] = r.v[k];
    *reinterpret_cast<Vec<T>*>(p) = v;
  }
}

template <class A>
__device__ __forceinline__ Moments<A> no_moments() {
  return Moments<A>{A(0), A(0), A(0)};
}

// Adds B values at once: their own mean and M2 (two-pass over registers), one
// Chan merge. Cheaper than B Welford steps (one division instead of B).
template <int B, class A>
__device__ __forceinline__ void add_batch(Moments<A>& m, const A (&d)[B]) {
  A sum = d[0];
#pragma unroll
  for (int b = 1; b < B; ++b) sum += d[b];
  const A mean = sum * (A(1) / A(B));  // B is a power of two: exact reciprocal
  A m2 = A(0);
#pragma unroll
  for (int b = 0; b < B; ++b) {
    const A e = d[b] - mean;
    m2 += e * e;
  }
  m = chan_merge(m, Moments<A>{A(B), mean, m2});
}

// Butterfly merges within aligned groups of `width` lanes (a power of two <=
// 32); every lane of the warp must call. The tree is fixed by lane numbers.
template <class A>
__device__ __forceinline__ Moments<A> subwarp_merge(Moments<A> m, int width) {
  for (int offset = width >> 1; offset > 0; offset >>= 1) {
    Moments<A> o;
    o.count = __shfl_xor_sync(0xffffffffu, m.count, offset);
    o.mean = __shfl_xor_sync(0xffffffffu, m.mean, offset);
    o.m2 = __shfl_xor_sync(0xffffffffu, m.m2, offset);
    m = chan_merge(m, o);
  }
  return m;
}

template <class V>
__device__ __forceinline__ V subwarp_sum(V v, int width) {
  for (int offset = width >> 1; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Backward sums relative to a center: dy, dy * (x - center), x - center.
template <class A>
struct GradSums {
  A dy, dy_xc, xc;
};

// ---- channels-first segments --------------------------------------------------------
// An owner is `runs` contiguous runs of `run_len` elements; run r of owner o
// starts at o * owner_stride + r * run_stride. Runs of at least `chunk`
// elements are cut into chunks (one run piece per segment); shorter runs are
// taken runs_per_segment at a time. A segment holds at most `chunk` elements;
// owner o's segments are partials [o * per_owner, (o + 1) * per_owner).
struct RunSegments {
  i64 owners = 0, owner_stride = 0, runs = 1, run_stride = 0, run_len = 1;
  i64 chunk = 1;
  bool split = false;
  i64 chunks_per_run = 1, runs_per_segment = 1;
  i64 per_owner = 1;
  int lanes = 32;  // lanes per segment, a power of two <= 32
  FastDiv by_per_owner, by_chunks_per_run;
  __host__ __device__ i64 total() const { return owners * per_owner; }
};

// `unit`: elements per load (sets how many lanes a short segment needs).
RunSegments make_run_segments(i64 owners, i64 owner_stride, i64 runs, i64 run_stride, i64 run_len, int elem_bytes,
                              int unit) {
  RunSegments r;
  r.owners = owners;
  r.owner_stride = owner_stride;
  r.runs = runs;
  r.run_stride = run_stride;
  r.run_len = run_len;
  auto segments_for = [&](i64 k) {
    return run_len >= k ? runs * ceil_div(run_len, k) : ceil_div(runs, k / run_len);
  };
  i64 k = kSegmentBytes / elem_bytes;  // a power of two, a multiple of kVec
  while (k < kMaxSegmentElems && segments_for(k) > kTargetPartials) k *= 2;
  r.chunk = k;
  r.split = run_len >= k;
  if (r.split) {
    r.chunks_per_run = ceil_div(run_len, k);
    r.per_owner = runs * r.chunks_per_run;
  } else {
    r.runs_per_segment = k / run_len;
    r.per_owner = ceil_div(runs, r.runs_per_segment);
  }
  const i64 max_elems = r.split ? k : std::min(r.runs_per_segment, runs) * run_len;
  r.lanes = pow2_at_least(max_elems / unit, 32);
  r.by_per_owner = FastDiv(r.per_owner);
  r.by_chunks_per_run = FastDiv(r.chunks_per_run);
  return r;
}

// One segment: `pieces` pieces of `len` elements, piece_stride apart.
struct Segment {
  i64 base, piece_stride;
  int pieces, len;
};

__device__ __forceinline__ Segment segment_at(const RunSegments& r, i64 seg, i64& owner) {
  owner = r.by_per_owner.div(seg);
  const i64 k = seg - owner * r.per_owner;
  Segment s;
  s.piece_stride = r.run_stride;
  if (r.split) {
    const i64 run = r.by_chunks_per_run.div(k);
    const i64 part = k - run * r.chunks_per_run;
    s.base = owner * r.owner_stride + run * r.run_stride + part * r.chunk;
    s.len = static_cast<int>(min64(r.chunk, r.run_len - part * r.chunk));
    s.pieces = 1;
  } else {
    const i64 first = k * r.runs_per_segment;
    s.base = owner * r.owner_stride + first * r.run_stride;
    s.len = static_cast<int>(r.run_len);
    s.pieces = static_cast<int>(min64(r.runs_per_segment, r.runs - first));
  }
  return s;
}

// Visits this lane's units (W elements each) of a segment: units lane,
// lane + lanes, ... in piece-major order, UB at a time; consume(offsets, got)
// gets the element offsets of `got` (<= UB) units. The (piece, unit) position
// steps without divisions.
template <int W, int UB, class F>
__device__ __forceinline__ void walk_segment(const Segment& s, int lane, int lanes, F&& consume) {
  const int len_u = s.len / W;
  int piece = lane / len_u, unit = lane - piece * len_u;
  const int step_pieces = lanes / len_u, step_units = lanes - step_pieces * len_u;
  while (piece < s.pieces) {
    i64 off[UB];
    int got = 0;
#pragma unroll
    for (int b = 0; b < UB; ++b) {
      off[b] = 0;
      if (piece < s.pieces) {
        off[b] = s.base + piece * s.piece_stride + static_cast<i64>(unit) * W;
        got = b + 1;
        unit += step_units;
        piece += step_pieces;
        if (unit >= len_u) {
          unit -= len_u;
          ++piece;
        }
      }
    }
    consume(off, got);
  }
}

// Loads per step: enough for 4 elements (ILP and batched Welford).
template <int W>
constexpr int kUnitsPerStep = W >= 4 ? 1 : 4 / W;

// ---- channels-last tiles ------------------------------------------------------------
// `batches` blocks of `rows_per_batch` rows of c channels (one sample's s rows
// for per-sample statistics, all n * s rows for BatchNorm), cut into chunks of
// chunk_rows rows; a tile is one chunk and tx units of W channels, threads
// (tx, ty) = (unit in tile, row phase). Partial (batch, chunk, channel) is at
// (batch * chunks + chunk) * c + channel.
struct ColumnTiles {
  i64 c = 0, units = 0;
  int tx = 32, ty = 8;
  i64 tiles = 1, batches = 1, rows_per_batch = 0, chunk_rows = 0, chunks = 1;
  FastDiv by_tiles, by_chunks;
  __host__ __device__ i64 items() const { return batches * chunks * tiles; }
};

ColumnTiles make_column_tiles(i64 c, int unit, i64 batches, i64 rows_per_batch) {
  ColumnTiles t;
  t.c = c;
  t.units = c / unit;
  t.tx = pow2_at_least(t.units, 32);
  t.ty = kThreads / t.tx;
  t.tiles = ceil_div(t.units, t.tx);
  t.batches = batches;
  t.rows_per_batch = rows_per_batch;
  i64 rows = t.ty * kRowsPerThread;
  while (rows < t.ty * kMaxRowsPerThread && ceil_div(rows_per_batch, rows) > kTargetPartials) rows *= 2;
  t.chunk_rows = rows;
  t.chunks = ceil_div(rows_per_batch, rows);
  t.by_tiles = FastDiv(t.tiles);
  t.by_chunks = FastDiv(t.chunks);
  return t;
}

// ---- statistics ---------------------------------------------------------------------

// Channels-first partial moments: one sub-warp per segment.
template <class T, int W>
__global__ void __launch_bounds__(kThreads)
    segment_moments_kernel(const T* x, RunSegments rs, Moments<acc_t<T>>* partials) {
  using A = acc_t<T>;
  constexpr int UB = kUnitsPerStep<W>;
  const int lane = threadIdx.x & 31, lanes = rs.lanes;
  const int slot = lane / lanes, sub = lane & (lanes - 1), per_warp = 32 / lanes;
  const i64 total = rs.total();
  const i64 warp_step = static_cast<i64>(gridDim.x) * kWarps;
  for (i64 w = static_cast<i64>(blockIdx.x) * kWarps + (threadIdx.x >> 5); w * per_warp < total; w += warp_step) {
    const i64 seg = w * per_warp + slot;
    Moments<A> m = no_moments<A>();
    if (seg < total) {
      i64 owner;
      const Segment s = segment_at(rs, seg, owner);
      const A shift = to_acc(x[owner * rs.owner_stride]);  // the owner's first element
      walk_segment<W, UB>(s, sub, lanes, [&](const i64(&off)[UB], int got) {
        if (got == UB) {
          A d[UB * W];
#pragma unroll
          for (int b = 0; b < UB; ++b) {
            const Pack<T, W> v = load_pack<W>(x + off[b]);
#pragma unroll
            for (int k = 0; k < W; ++k) d[b * W + k] = to_acc(v.v[k]) - shift;
          }
          add_batch(m, d);
        } else {
#pragma unroll
          for (int b = 0; b < UB; ++b)
            if (b < got) {
              const Pack<T, W> v = load_pack<W>(x + off[b]);
#pragma unroll
              for (int k = 0; k < W; ++k) welford_add(m, to_acc(v.v[k]) - shift);
            }
        }
      });
    }
    m = subwarp_merge(m, lanes);
    if (seg < total && sub == 0) partials[seg] = m;
  }
}

// Channels-last partial moments per (batch, chunk, channel). The shift of
// channel ch is the batch's row-0 element of ch's group's first channel
// (group = channel for BatchNorm: by_cpg divides by 1).
template <class T, int W>
__global__ void __launch_bounds__(kThreads)
    column_moments_kernel(const T* x, ColumnTiles ct, FastDiv by_cpg, i64 cpg, Moments<acc_t<T>>* partials) {
  using A = acc_t<T>;
  constexpr int RB = 4;  // rows per batched Welford step
  __shared__ Moments<A> shared[kThreads * W];
  const int tx = threadIdx.x & (ct.tx - 1), ty = threadIdx.x / ct.tx;
  for (i64 item = blockIdx.x; item < ct.items(); item += gridDim.x) {
    const i64 bc = ct.by_tiles.div(item), tile = item - bc * ct.tiles;
    const i64 batch = ct.by_chunks.div(bc), chunk = bc - batch * ct.chunks;
    const i64 unit = tile * ct.tx + tx;
    const bool active = unit < ct.units;
    const T* xb = x + batch * ct.rows_per_batch * ct.c;
    const i64 row_end = min64(ct.rows_per_batch, (chunk + 1) * ct.chunk_rows);
    Moments<A> m[W];
#pragma unroll
    for (int k = 0; k < W; ++k) m[k] = no_moments<A>();
    if (active) {
      A shift[W];
#pragma unroll
      for (int k = 0; k < W; ++k) shift[k] = to_acc(xb[by_cpg.div(unit * W + k) * cpg]);
      const T* xu = xb + unit * W;
      const i64 step = ct.ty;
      i64 r = chunk * ct.chunk_rows + ty;
      for (; r + (RB - 1) * step < row_end; r += RB * step) {
        Pack<T, W> v[RB];
#pragma unroll
        for (int b = 0; b < RB; ++b) v[b] = load_pack<W>(xu + (r + b * step) * ct.c);
#pragma unroll
        for (int k = 0; k < W; ++k) {
          A d[RB];
#pragma unroll
          for (int b = 0; b < RB; ++b) d[b] = to_acc(v[b].v[k]) - shift[k];
          add_batch(m[k], d);
        }
      }
      for (; r < row_end; r += step) {
        const Pack<T, W> v = load_pack<W>(xu + r * ct.c);
#pragma unroll
        for (int k = 0; k < W; ++k) welford_add(m[k], to_acc(v.v[k]) - shift[k]);
      }
    }
    // Merge over ty: a fixed tree, row phase ty absorbs ty + half.
    Moments<A>* mine = shared + threadIdx.x * W;
#pragma unroll
    for (int k = 0; k < W; ++k) mine[k] = m[k];
    for (int half = ct.ty >> 1; half > 0; half >>= 1) {
      __syncthreads();
      if (ty < half) {
        const Moments<A>* other = shared + (threadIdx.x + half * ct.tx) * W;
#pragma unroll
        for (int k = 0; k < W; ++k) mine[k] = chan_merge(mine[k], other[k]);
      }
    }
    __syncthreads();
    if (ty == 0 && active)
#pragma unroll
      for (int k = 0; k < W; ++k) partials[bc * ct.c + unit * W + k] = mine[k];
    __syncthreads();  // `shared` is reused by the next item
  }
}

template <class T>
struct StatsFinalizeArgs {
  const T* x = nullptr;
  const Moments<acc_t<T>>* partials = nullptr;
  i64 num_q = 0;
  bool channels_last = false, per_sample = false;
  i64 per_owner = 1, owner_stride = 0;          // channels-first layout
  i64 chunks = 1, c = 1, s = 1, groups = 1, cpg = 1;  // channels-last layout
  i64 count = 1;
  double eps = 0, momentum = 0;
  acc_t<T>* mean = nullptr;
  acc_t<T>* rstd = nullptr;
  acc_t<T>* mean_lo = nullptr;       // optional: the mean's part below acc precision
  acc_t<T>* group_var = nullptr;     // biased variance per group, for InstanceNorm's running update
  acc_t<T>* running_mean = nullptr;  // BatchNorm's running update (per channel = per group)
  acc_t<T>* running_var = nullptr;
};

// One warp per group: merges the group's partials (lane l takes partials l,
// l + 32, ... in order, then a fixed butterfly), writes mean and rstd.
template <class T>
__global__ void __launch_bounds__(kThreads) stats_finalize_kernel(StatsFinalizeArgs<T> a) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const i64 warp_step = static_cast<i64>(gridDim.x) * kWarps;
  for (i64 q = static_cast<i64>(blockIdx.x) * kWarps + (threadIdx.x >> 5); q < a.num_q; q += warp_step) {
    // Partials first + k * outer_stride + j, k < outer, j < inner.
    i64 first, inner, outer, outer_stride, shift_at;
    if (!a.channels_last) {
      first = q * a.per_owner;
      inner = a.per_owner;
      outer = 1;
      outer_stride = 0;
      shift_at = q * a.owner_stride;
    } else {
      const i64 sample = a.per_sample ? q / a.groups : 0;
      const i64 ch0 = a.per_sample ? (q - sample * a.groups) * a.cpg : q;
      first = sample * a.chunks * a.c + ch0;
      inner = a.cpg;
      outer = a.chunks;
      outer_stride = a.c;
      shift_at = sample * a.s * a.c + ch0;
    }
    i64 k = lane / inner, j = lane - k * inner;
    const i64 step_k = 32 / inner, step_j = 32 - step_k * inner;
    Moments<A> m = no_moments<A>();
    while (k < outer) {
      m = chan_merge(m, a.partials[first + k * outer_stride + j]);
      j += step_j;
      k += step_k;
      if (j >= inner) {
        j -= inner;
        ++k;
      }
    }
    m = warp_merge(m);
    if (lane == 0) {
      const A var = m.m2 / static_cast<A>(a.count);  // exact count (m.count may round above 2^24)
      const A shift = to_acc(a.x[shift_at]);
      const A mean = shift + m.mean;
      a.mean[q] = mean;
      if (a.mean_lo) a.mean_lo[q] = static_cast<A>((double(shift) + double(m.mean)) - double(mean));
      a.rstd[q] = rsqrt_acc(var + static_cast<A>(a.eps));
      if (a.group_var) a.group_var[q] = var;
      const double mom = a.momentum;
      if (a.running_mean)
        a.running_mean[q] = static_cast<A>((1 - mom) * double(a.running_mean[q]) + mom * double(mean));
      if (a.running_var) {
        const double cnt = static_cast<double>(a.count);
        const double unbiased = double(var) * cnt / (cnt - 1);
        a.running_var[q] = static_cast<A>((1 - mom) * double(a.running_var[q]) + mom * unbiased);
      }
    }
  }
}

// InstanceNorm's running statistics: per channel, the mean over samples (in
// sample order, in double) of the instance means and unbiased variances.
template <class A>
__global__ void __launch_bounds__(kThreads)
    instance_running_kernel(const A* mean, const A* var, i64 n, i64 c, double unbias, double momentum,
                            A* running_mean, A* running_var) {
  for (i64 ch = static_cast<i64>(blockIdx.x) * kThreads + threadIdx.x; ch < c;
       ch += static_cast<i64>(gridDim.x) * kThreads) {
    double sum_mean = 0, sum_var = 0;
    for (i64 i = 0; i < n; ++i) {
      sum_mean += double(mean[i * c + ch]);
      sum_var += double(var[i * c + ch]);
    }
    const double dn = static_cast<double>(n);
    if (running_mean)
      running_mean[ch] = static_cast<A>((1 - momentum) * double(running_mean[ch]) + momentum * (sum_mean / dn));
    if (running_var)
      running_var[ch] =
          static_cast<A>((1 - momentum) * double(running_var[ch]) + momentum * (sum_var * unbias / dn));
  }
}

// ---- backward sums --------------------------------------------------------------------

// Channels-first partial sums per segment; owner o's center is mean[o / cpg]
// (planes: o = sample * c + channel gives the group; BatchNorm: cpg = 1).
template <class T, int W>
__global__ void __launch_bounds__(kThreads)
    segment_grad_sums_kernel(const T* x, const T* dy, RunSegments rs, FastDiv owner_to_group,
                             const acc_t<T>* mean, GradSums<acc_t<T>>* partials) {
  using A = acc_t<T>;
  constexpr int UB = kUnitsPerStep<W>;
  const int lane = threadIdx.x & 31, lanes = rs.lanes;
  const int slot = lane / lanes, sub = lane & (lanes - 1), per_warp = 32 / lanes;
  const i64 total = rs.total();
  const i64 warp_step = static_cast<i64>(gridDim.x) * kWarps;
  for (i64 w = static_cast<i64>(blockIdx.x) * kWarps + (threadIdx.x >> 5); w * per_warp < total; w += warp_step) {
    const i64 seg = w * per_warp + slot;
    A sum_dy = A(0), sum_dy_xc = A(0), sum_xc = A(0);
    if (seg < total) {
      i64 owner;
      const Segment s = segment_at(rs, seg, owner);
      const A center = mean[owner_to_group.div(owner)];
      walk_segment<W, UB>(s, sub, lanes, [&](const i64(&off)[UB], int got) {
#pragma unroll
        for (int b = 0; b < UB; ++b)
          if (b < got) {
            const Pack<T, W> xv = load_pack<W>(x + off[b]);
            const Pack<T, W> dv = load_pack<W>(dy + off[b]);
#pragma unroll
            for (int k = 0; k < W; ++k) {
              const A xc = to_acc(xv.v[k]) - center, d = to_acc(dv.v[k]);
              sum_dy += d;
              sum_dy_xc += d * xc;
              sum_xc += xc;
            }
          }
      });
    }
    sum_dy = subwarp_sum(sum_dy, lanes);
    sum_dy_xc = subwarp_sum(sum_dy_xc, lanes);
    sum_xc = subwarp_sum(sum_xc, lanes);
    if (seg < total && sub == 0) partials[seg] = GradSums<A>{sum_dy, sum_dy_xc, sum_xc};
  }
}

// Channels-last partial sums per (batch, chunk, channel); channel ch of batch
// b is centered on mean[b * groups + ch / cpg] (BatchNorm: one batch, cpg 1).
template <class T, int W>
__global__ void __launch_bounds__(kThreads)
    column_grad_sums_kernel(const T* x, const T* dy, ColumnTiles ct, FastDiv by_cpg, i64 groups,
                            const acc_t<T>* mean, GradSums<acc_t<T>>* partials) {
  using A = acc_t<T>;
  __shared__ GradSums<A> shared[kThreads * W];
  const int tx = threadIdx.x & (ct.tx - 1), ty = threadIdx.x / ct.tx;
  for (i64 item = blockIdx.x; item < ct.items(); item += gridDim.x) {
    const i64 bc = ct.by_tiles.div(item), tile = item - bc * ct.tiles;
    const i64 batch = ct.by_chunks.div(bc), chunk = bc - batch * ct.chunks;
    const i64 unit = tile * ct.tx + tx;
    const bool active = unit < ct.units;
    const i64 batch_off = batch * ct.rows_per_batch * ct.c;
    const i64 row_end = min64(ct.rows_per_batch, (chunk + 1) * ct.chunk_rows);
    GradSums<A> g[W];
#pragma unroll
    for (int k = 0; k < W; ++k) g[k] = GradSums<A>{A(0), A(0), A(0)};
    if (active) {
      A center[W];
#pragma unroll
      for (int k = 0; k < W; ++k) center[k] = mean[batch * groups + by_cpg.div(unit * W + k)];
      const T* xu = x + batch_off + unit * W;
      const T* dyu = dy + batch_off + unit * W;
#pragma unroll 4
      for (i64 r = chunk * ct.chunk_rows + ty; r < row_end; r += ct.ty) {
        const Pack<T, W> xv = load_pack<W>(xu + r * ct.c);
        const Pack<T, W> dv = load_pack<W>(dyu + r * ct.c);
#pragma unroll
        for (int k = 0; k < W; ++k) {
          const A xc = to_acc(xv.v[k]) - center[k], d = to_acc(dv.v[k]);
          g[k].dy += d;
          g[k].dy_xc += d * xc;
          g[k].xc += xc;
        }
      }
    }
    GradSums<A>* mine = shared + threadIdx.x * W;
#pragma unroll
    for (int k = 0; k < W; ++k) mine[k] = g[k];
    for (int half = ct.ty >> 1; half > 0; half >>= 1) {
      __syncthreads();
      if (ty < half) {
        const GradSums<A>* other = shared + (threadIdx.x + half * ct.tx) * W;
#pragma unroll
        for (int k = 0; k < W; ++k) {
          mine[k].dy += other[k].dy;
          mine[k].dy_xc += other[k].dy_xc;
          mine[k].xc += other[k].xc;
        }
      }
    }
    __syncthreads();
    if (ty == 0 && active)
#pragma unroll
      for (int k = 0; k < W; ++k) partials[bc * ct.c + unit * W + k] = mine[k];
    __syncthreads();
  }
}

// An entry is a (sample, channel) pair (per-sample norms, e = sample * c + ch)
// or a channel (BatchNorm, e = ch). Group q holds entries q * entries + j.
template <class A>
struct GradGroupArgs {
  const GradSums<A>* partials = nullptr;
  i64 num_q = 0, entries = 1, per_entry = 1;  // per_entry: partials per entry (chunks per batch when channels-last)
  bool channels_last = false;
  i64 c = 1, groups_div = 1;  // sample of group q = q / groups_div (BatchNorm: c, so 0)
  int entry_lanes = 32;       // lanes summing one entry's partials
  i64 count = 1;
  bool training = true;
  const A* mean = nullptr;
  const A* rstd = nullptr;
  const A* weight = nullptr;
  i64 weight_n_stride = 0;
  double* entry_dy = nullptr;       // scratch per entry: sum dy
  double* entry_dy_xhat = nullptr;  // scratch per entry: sum dy * (x - center), then sum dy * xhat
  A* center = nullptr;              // training tables per entry (null: none)
  A* center_lo = nullptr;           // (mean + delta) - center: the part A cannot hold
  A* norm_scale = nullptr;          // rstd
  A* scale = nullptr;
  A* shift = nullptr;
  A* dy_scale = nullptr;
  A* sum_dy = nullptr;  // parameter gradients written per entry (or null)
  A* sum_dy_xhat = nullptr;
};

// One warp per group, in double: the entries' sums (each entry's partials
// summed in order by entry_lanes lanes, then a fixed butterfly), the group's
// exact-mean correction delta and sums of g = dy * w, then per entry
// sum_dy_xhat and the dx tables:
//   dx = dy * (w * rstd) + xhat * scale + shift,
//   xhat = ((x - center) - center_lo) * rstd, center + center_lo = mean + delta,
//   scale = -rstd * (sum_gx / count), shift = -rstd * (sum_g / count).
// xhat is formed first: a single factor rstd * rstd * mean(g * xhat) overflows
// float for rstd > 1.8e19 although dx is finite.
template <class A>
__global__ void __launch_bounds__(kThreads) grad_group_kernel(GradGroupArgs<A> a) {
  const int lane = threadIdx.x & 31;
  const int lanes = a.entry_lanes, slot = lane / lanes, sub = lane & (lanes - 1), per_pass = 32 / lanes;
  const i64 warp_step = static_cast<i64>(gridDim.x) * kWarps;
  for (i64 q = static_cast<i64>(blockIdx.x) * kWarps + (threadIdx.x >> 5); q < a.num_q; q += warp_step) {
    const i64 sample = q / a.groups_div;
    const i64 ch0 = (q - sample * a.groups_div) * a.entries;  // the group's first channel
    const A* w = a.weight ? a.weight + sample * a.weight_n_stride + ch0 : nullptr;
    double sum_xc = 0, sum_w_dy = 0, sum_w_dy_xc = 0;  // only in lanes with sub == 0
    for (i64 j0 = 0; j0 < a.entries; j0 += per_pass) {
      const i64 j = j0 + slot;
      double s_dy = 0, s_dy_xc = 0, s_xc = 0;
      if (j < a.entries) {
        // Partials of entry j: first + k * stride, k < per_entry.
        const i64 first = a.channels_last ? sample * a.per_entry * a.c + ch0 + j : (q * a.entries + j) * a.per_entry;
        const i64 stride = a.channels_last ? a.c : 1;
        for (i64 k = sub; k < a.per_entry; k += lanes) {
          const GradSums<A> g = a.partials[first + k * stride];
          s_dy += double(g.dy);
          s_dy_xc += double(g.dy_xc);
          s_xc += double(g.xc);
        }
      }
      s_dy = subwarp_sum(s_dy, lanes);
      s_dy_xc = subwarp_sum(s_dy_xc, lanes);
      s_xc = subwarp_sum(s_xc, lanes);
      if (j < a.entries && sub == 0) {
        const i64 e = q * a.entries + j;
        a.entry_dy[e] = s_dy;
        a.entry_dy_xhat[e] = s_dy_xc;
        const double wj = w ? double(w[j]) : 1.0;
        sum_xc += s_xc;
        sum_w_dy += wj * s_dy;
        sum_w_dy_xc += wj * s_dy_xc;
      }
    }
    sum_xc = warp_sum(sum_xc);
    sum_w_dy = warp_sum(sum_w_dy);
    sum_w_dy_xc = warp_sum(sum_w_dy_xc);
    const double count = static_cast<double>(a.count), rs = double(a.rstd[q]);
    const double delta = a.training ? sum_xc / count : 0.0;  // exact mean = mean + delta
    const double sum_g = sum_w_dy;
    const double sum_gx = rs * (sum_w_dy_xc - delta * sum_w_dy);  // sum over the group of g * xhat
    const A scale = static_cast<A>(-rs * (sum_gx / count));
    const A shift = static_cast<A>(-rs * (sum_g / count));
    // The exact mean mean + delta in two parts, center + center_lo: with x
    // near 1e4 and std 1e-2, float's rounding of the mean alone is 5% of an
    // xhat unit. TwoSum keeps the error of the sum for double too.
    const double mean_q = double(a.mean[q]);
    const double exact_mean = mean_q + delta;
    const double back = exact_mean - mean_q;
    const double sum_error = (mean_q - (exact_mean - back)) + (delta - back);
    const A center = static_cast<A>(exact_mean);
    const A center_lo = static_cast<A>((exact_mean - double(center)) + sum_error);
    __syncwarp();  // entry sums written by other lanes above
    for (i64 j = lane; j < a.entries; j += 32) {
      const i64 e = q * a.entries + j;
      const double s_dy = a.entry_dy[e];
      const double s_dy_xhat = rs * (a.entry_dy_xhat[e] - delta * s_dy);
      a.entry_dy_xhat[e] = s_dy_xhat;
      if (a.sum_dy) a.sum_dy[e] = static_cast<A>(s_dy);
      if (a.sum_dy_xhat) a.sum_dy_xhat[e] = static_cast<A>(s_dy_xhat);
      if (a.center) {
        const double wj = w ? double(w[j]) : 1.0;
        a.center[e] = center;
        a.center_lo[e] = center_lo;
        a.norm_scale[e] = static_cast<A>(rs);
        a.scale[e] = scale;
        a.shift[e] = shift;
        a.dy_scale[e] = static_cast<A>(wj * rs);
      }
    }
  }
}

// Parameter gradients summed over samples, per channel, in sample order.
template <class A>
__global__ void __launch_bounds__(kThreads)
    sum_over_samples_kernel(const double* entry_dy, const double* entry_dy_xhat, i64 n, i64 c, A* sum_dy,
                            A* sum_dy_xhat) {
  for (i64 ch = static_cast<i64>(blockIdx.x) * kThreads + threadIdx.x; ch < c;
       ch += static_cast<i64>(gridDim.x) * kThreads) {
    double s_dy = 0, s_dy_xhat = 0;
    for (i64 i = 0; i < n; ++i) {
      s_dy += entry_dy[i * c + ch];
      s_dy_xhat += entry_dy_xhat[i * c + ch];
    }
    if (sum_dy) sum_dy[ch] = static_cast<A>(s_dy);
    if (sum_dy_xhat) sum_dy_xhat[ch] = static_cast<A>(s_dy_xhat);
  }
}

// Constant statistics: dx = dy * (w * rstd) as tables for the apply (x = dy).
template <class A>
__global__ void __launch_bounds__(kThreads)
    constant_stats_table_kernel(i64 entries, i64 c, i64 cpg, bool per_sample, const A* rstd, const A* weight,
                                i64 weight_n_stride, A* center, A* scale, A* shift) {
  for (i64 i = static_cast<i64>(blockIdx.x) * kThreads + threadIdx.x; i < entries;
       i += static_cast<i64>(gridDim.x) * kThreads) {
    const i64 sample = per_sample ? i / c : 0, ch = i - sample * c;
    const i64 q = per_sample ? i / cpg : i;
    const A w = weight ? weight[sample * weight_n_stride + ch] : A(1);
    center[i] = A(0);
    scale[i] = w * rstd[q];
    shift[i] = A(0);
  }
}

// ---- forward tables, style tables -------------------------------------------------------

template <class A>
__global__ void __launch_bounds__(kThreads)
    fold_forward_kernel(i64 entries, i64 c, i64 cpg, bool per_sample, const A* mean, const A* rstd,
                        const A* weight, const A* bias, const A* style_std, const A* style_mean, A* center, A* scale,
                        A* shift, const A* mean_lo, A* center_lo) {
  for (i64 i = static_cast<i64>(blockIdx.x) * kThreads + threadIdx.x; i < entries;
       i += static_cast<i64>(gridDim.x) * kThreads) {
    const i64 ch = i % c;
    const i64 q = per_sample ? i / cpg : ch;  // i / cpg = sample * groups + ch / cpg
    const A w = style_std ? style_std[i] : (weight ? weight[ch] : A(1));
    const A b = style_mean ? style_mean[i] : (bias ? bias[ch] : A(0));
    center[i] = mean[q];
    if (mean_lo) center_lo[i] = mean_lo[q];
    scale[i] = rstd[q] * w;
    shift[i] = b;
  }
}

// dstyle = dmean / S + dstd * (style - mean) * rstd / S as apply tables.
template <class A>
__global__ void __launch_bounds__(kThreads)
    style_table_kernel(i64 entries, A count, const A* mean, const A* rstd, const A* dmean, const A* dstd, A* center,
                       A* scale, A* shift) {
  for (i64 i = static_cast<i64>(blockIdx.x) * kThreads + threadIdx.x; i < entries;
       i += static_cast<i64>(gridDim.x) * kThreads) {
    center[i] = mean[i];
    scale[i] = dstd[i] * (rstd[i] / count);
    shift[i] = dmean[i] / count;
  }
}

// ---- apply ------------------------------------------------------------------------------

template <class T>
struct ApplyArgs {
  const T* x = nullptr;
  T* y = nullptr;  // may be x or dy: each element is read before it is written
  const acc_t<T>* center = nullptr;
  const acc_t<T>* scale = nullptr;
  const acc_t<T>* shift = nullptr;
  const T* dy = nullptr;
  const acc_t<T>* dy_scale = nullptr;
  // Optional (the backward's own tables): the center's low part, and a first
  // factor, so scale need not hold rstd * rstd (it overflows float for
  // rstd > 1.8e19 although dx is finite).
  const acc_t<T>* center_lo = nullptr;
  const acc_t<T>* norm_scale = nullptr;
  i64 table_n_stride = 0;
};

// One table entry: y = ((x - center) - center_lo) * norm_scale * scale + shift + dy * dy_scale
// (center_lo = 0, norm_scale = 1, dy_scale = 0 where not given: exact no-ops).
template <class A>
struct ApplyEntry {
  A center, center_lo, norm_scale, scale, shift, dy_scale;
};

template <class T>
__device__ __forceinline__ ApplyEntry<acc_t<T>> load_entry(const ApplyArgs<T>& a, i64 t) {
  using A = acc_t<T>;
  ApplyEntry<A> e;
  e.center = a.center[t];
  e.center_lo = a.center_lo ? a.center_lo[t] : A(0);
  e.norm_scale = a.norm_scale ? a.norm_scale[t] : A(1);
  e.scale = a.scale[t];
  e.shift = a.shift[t];
  e.dy_scale = a.dy ? a.dy_scale[t] : A(0);
  return e;
}

template <class A>
__device__ __forceinline__ A apply_entry(const ApplyEntry<A>& e, A x, A dy) {
  return ((x - e.center) - e.center_lo) * e.norm_scale * e.scale + e.shift + dy * e.dy_scale;
}

// Channels-first: a work item is a chunk of one plane (sample, channel);
// tx threads along the plane, ty items per block. Tables read once per item.
struct PlaneTiling {
  i64 planes = 0, s = 0, units = 0, c = 1;
  int tx = kThreads, ty = 1;
  i64 chunk_units = 0, chunks = 1;
  FastDiv by_chunks, by_c;
  __host__ __device__ i64 items() const { return planes * chunks; }
};

template <class T, int W>
__global__ void __launch_bounds__(kThreads) plane_apply_kernel(ApplyArgs<T> a, PlaneTiling pt) {
  using A = acc_t<T>;
  const int tx = threadIdx.x & (pt.tx - 1), ty = threadIdx.x / pt.tx;
  const i64 items = pt.items();
  for (i64 item = static_cast<i64>(blockIdx.x) * pt.ty + ty; item < items;
       item += static_cast<i64>(gridDim.x) * pt.ty) {
    const i64 plane = pt.by_chunks.div(item), chunk = item - plane * pt.chunks;
    const i64 sample = pt.by_c.div(plane), ch = plane - sample * pt.c;
    const ApplyEntry<A> e = load_entry(a, sample * a.table_n_stride + ch);
    const i64 end = min64(pt.units, (chunk + 1) * pt.chunk_units);
    const i64 plane_off = plane * pt.s;
    for (i64 u = chunk * pt.chunk_units + tx; u < end; u += pt.tx) {
      const i64 off = plane_off + u * W;
      const Pack<T, W> xv = load_pack<W>(a.x + off);
      Pack<T, W> out;
      if (a.dy) {
        const Pack<T, W> dv = load_pack<W>(a.dy + off);
#pragma unroll
        for (int k = 0; k < W; ++k) out.v[k] = from_acc<T>(apply_entry(e, to_acc(xv.v[k]), to_acc(dv.v[k])));
      } else {
#pragma unroll
        for (int k = 0; k < W; ++k) out.v[k] = from_acc<T>(apply_entry(e, to_acc(xv.v[k]), A(0)));
      }
      store_pack<W>(a.y + off, out);
    }
  }
}

// Channels-last: rows = sample * s + spatial; a work item is a chunk of rows
// and tx units of W channels. Each thread keeps its channels' tables in
// registers, reloaded when its row enters another sample.
struct RowTiling {
  i64 rows = 0, c = 0, units = 0;
  int tx = 32, ty = 8;
  i64 tiles = 1, chunk_rows = 0, row_chunks = 1;
  FastDiv by_tiles, by_s;
  __host__ __device__ i64 items() const { return row_chunks * tiles; }
};

template <class T, int W>
__global__ void __launch_bounds__(kThreads) row_apply_kernel(ApplyArgs<T> a, RowTiling rt) {
  using A = acc_t<T>;
  const int tx = threadIdx.x & (rt.tx - 1), ty = threadIdx.x / rt.tx;
  const i64 items = rt.items();
  for (i64 item = blockIdx.x; item < items; item += gridDim.x) {
    const i64 rc = rt.by_tiles.div(item), tile = item - rc * rt.tiles;
    const i64 unit = tile * rt.tx + tx;
    if (unit >= rt.units) continue;
    const i64 row_end = min64(rt.rows, (rc + 1) * rt.chunk_rows);
    i64 table_sample = -1;
    ApplyEntry<A> e[W];
    for (i64 r = rc * rt.chunk_rows + ty; r < row_end; r += rt.ty) {
      const i64 sample = a.table_n_stride ? rt.by_s.div(r) : 0;
      if (sample != table_sample) {  // always on the first row
        table_sample = sample;
#pragma unroll
        for (int k = 0; k < W; ++k) e[k] = load_entry(a, sample * a.table_n_stride + unit * W + k);
      }
      const i64 off = r * rt.c + unit * W;
      const Pack<T, W> xv = load_pack<W>(a.x + off);
      Pack<T, W> out;
      if (a.dy) {
        const Pack<T, W> dv = load_pack<W>(a.dy + off);
#pragma unroll
        for (int k = 0; k < W; ++k) out.v[k] = from_acc<T>(apply_entry(e[k], to_acc(xv.v[k]), to_acc(dv.v[k])));
      } else {
#pragma unroll
        for (int k = 0; k < W; ++k) out.v[k] = from_acc<T>(apply_entry(e[k], to_acc(xv.v[k]), A(0)));
      }
      store_pack<W>(a.y + off, out);
    }
  }
}

// ---- convert --------------------------------------------------------------------------

__device__ __forceinline__ double load_as_double(const void* p, DType t, i64 i) {
  switch (t) {
    case DType::float32: return static_cast<const float*>(p)[i];
    case DType::float64: return static_cast<const double*>(p)[i];
    case DType::float16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::bfloat16: break;
  }
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

// Rounds once, from double (every source dtype widens to double exactly).
__device__ __forceinline__ void store_from_double(void* p, DType t, i64 i, double v) {
  switch (t) {
    case DType::float32: static_cast<float*>(p)[i] = static_cast<float>(v); return;
    case DType::float64: static_cast<double*>(p)[i] = v; return;
    case DType::float16: static_cast<__half*>(p)[i] = __double2half(v); return;
    case DType::bfloat16: static_cast<__nv_bfloat16*>(p)[i] = __double2bfloat16(v); return;
  }
}

__global__ void __launch_bounds__(kThreads)
    convert_kernel(const void* src, DType src_dtype, i64 src_stride, void* dst, DType dst_dtype, i64 dst_stride,
                   i64 count) {
  for (i64 i = static_cast<i64>(blockIdx.x) * kThreads + threadIdx.x; i < count;
       i += static_cast<i64>(gridDim.x) * kThreads)
    store_from_double(dst, dst_dtype, i * dst_stride, load_as_double(src, src_dtype, i * src_stride));
}

// ---- host launchers -----------------------------------------------------------------------

void check_groups(bool per_sample, i64 groups, i64 c) {
  if (per_sample && (groups < 1 || c % groups != 0))
    throw Error(ErrorKind::value, "groups: must divide the channels (" + std::to_string(c) + "), got " +
                                      std::to_string(groups));
}

template <class T, int W>
void launch_plane_apply(const ChannelShape& shape, const ApplyArgs<T>& a, cudaStream_t st) {
  PlaneTiling pt;
  pt.planes = shape.n * shape.c;
  pt.s = shape.s;
  pt.units = shape.s / W;
  pt.c = shape.c;
  pt.tx = pow2_at_least(pt.units, kThreads);
  pt.ty = kThreads / pt.tx;
  pt.chunk_units = static_cast<i64>(pt.tx) * std::max(1, kElemsPerThread / W);
  pt.chunks = ceil_div(pt.units, pt.chunk_units);
  pt.by_chunks = FastDiv(pt.chunks);
  pt.by_c = FastDiv(shape.c);
  plane_apply_kernel<T, W><<<grid_1d(pt.items(), pt.ty), kThreads, 0, st>>>(a, pt);
  check_launch("plane_apply_kernel");
}

template <class T, int W>
void launch_row_apply(const ChannelShape& shape, const ApplyArgs<T>& a, cudaStream_t st) {
  RowTiling rt;
  rt.rows = shape.n * shape.s;
  rt.c = shape.c;
  rt.units = shape.c / W;
  rt.tx = pow2_at_least(rt.units, 32);
  rt.ty = kThreads / rt.tx;
  rt.tiles = ceil_div(rt.units, rt.tx);
  rt.chunk_rows = static_cast<i64>(rt.ty) * std::max(1, kElemsPerThread / W);
  rt.row_chunks = ceil_div(rt.rows, rt.chunk_rows);
  rt.by_tiles = FastDiv(rt.tiles);
  rt.by_s = FastDiv(shape.s);
  row_apply_kernel<T, W><<<grid_1d(rt.items(), 1), kThreads, 0, st>>>(a, rt);
  check_launch("row_apply_kernel");
}

template <class T>
void launch_apply(const ChannelShape& shape, const ApplyArgs<T>& a, cudaStream_t st) {
  const bool aligned = aligned16(a.x) && aligned16(a.y) && (a.dy == nullptr || aligned16(a.dy));
  if (!shape.channels_last && shape.s > 1) {
    if (aligned && shape.s % kVec<T> == 0) launch_plane_apply<T, kVec<T>>(shape, a, st);
    else launch_plane_apply<T, 1>(shape, a, st);
  } else {  // channels-last, or [n][c][1], the same memory as [n][1][c]
    if (aligned && shape.c % kVec<T> == 0) launch_row_apply<T, kVec<T>>(shape, a, st);
    else launch_row_apply<T, 1>(shape, a, st);
  }
}

// Channels-last reductions, except where s == 1 makes both layouts the same
// memory: per-sample groups are then contiguous runs (channels-first reads
// them better), BatchNorm's channels are columns.
bool reduce_as_columns(const ChannelShape& shape, bool per_sample) {
  return shape.s == 1 ? !per_sample : shape.channels_last;
}

template <class T>
void stats_typed(const ChannelStats& p, cudaStream_t st) {
  using A = acc_t<T>;
  const i64 n = p.shape.n, c = p.shape.c, s = p.shape.s;
  check_groups(p.per_sample, p.groups, c);
  const i64 groups = p.per_sample ? p.groups : 1;
  const i64 cpg = p.per_sample ? c / groups : 1;
  const i64 num_q = p.per_sample ? n * groups : c;
  const i64 count = p.per_sample ? cpg * s : n * s;
  const bool running = p.running_mean || p.running_var;
  if (running && p.per_sample && groups != c)
    throw Error(ErrorKind::value, "running_mean: running statistics need BatchNorm or InstanceNorm (groups == c)");
  const T* x = static_cast<const T*>(p.x);
  const bool columns = reduce_as_columns(p.shape, p.per_sample);

  StatsFinalizeArgs<T> f;
  f.x = x;
  f.num_q = num_q;
  f.channels_last = columns;
  f.per_sample = p.per_sample;
  f.c = c;
  f.s = s;
  f.groups = groups;
  f.cpg = cpg;
  f.count = count;
  f.eps = p.eps;
  f.momentum = p.momentum;
  f.mean = static_cast<A*>(p.mean);
  f.rstd = static_cast<A*>(p.rstd);
  f.mean_lo = static_cast<A*>(p.mean_lo);

  RunSegments rs;
  ColumnTiles ct;
  bool vec;
  i64 partial_count;
  if (!columns) {
    // Per-sample: group q is one run of cpg * s elements at q * cpg * s.
    // BatchNorm: channel ch is n runs of s elements, c * s apart.
    const i64 run = p.per_sample ? cpg * s : s;
    vec = aligned16(x) && run % kVec<T> == 0;
    const int unit = vec ? kVec<T> : 1;
    rs = p.per_sample ? make_run_segments(num_q, run, 1, run, run, sizeof(T), unit)
                      : make_run_segments(c, s, n, c * s, s, sizeof(T), unit);
    partial_count = rs.total();
    f.per_owner = rs.per_owner;
    f.owner_stride = rs.owner_stride;
  } else {
    vec = aligned16(x) && c % kVec<T> == 0;
    ct = make_column_tiles(c, vec ? kVec<T> : 1, p.per_sample ? n : 1, p.per_sample ? s : n * s);
    partial_count = ct.batches * ct.chunks * c;
    f.chunks = ct.chunks;
  }
  Scratch partials(static_cast<std::size_t>(partial_count) * sizeof(Moments<A>), st);
  f.partials = partials.as<Moments<A>>();
  if (!columns) {
    const unsigned grid = grid_1d(ceil_div(rs.total(), 32 / rs.lanes), kWarps);
    if (vec) segment_moments_kernel<T, kVec<T>><<<grid, kThreads, 0, st>>>(x, rs, partials.as<Moments<A>>());
    else segment_moments_kernel<T, 1><<<grid, kThreads, 0, st>>>(x, rs, partials.as<Moments<A>>());
    check_launch("segment_moments_kernel");
  } else {
    const unsigned grid = grid_1d(ct.items(), 1);
    if (vec)
      column_moments_kernel<T, kVec<T>><<<grid, kThreads, 0, st>>>(x, ct, FastDiv(cpg), cpg,
                                                                   partials.as<Moments<A>>());
    else
      column_moments_kernel<T, 1><<<grid, kThreads, 0, st>>>(x, ct, FastDiv(cpg), cpg, partials.as<Moments<A>>());
    check_launch("column_moments_kernel");
  }

  const bool instance_running = running && p.per_sample;
  Scratch group_var(instance_running ? static_cast<std::size_t>(num_q) * sizeof(A) : 0, st);
  if (instance_running) f.group_var = group_var.as<A>();
  if (running && !p.per_sample) {
    f.running_mean = static_cast<A*>(p.running_mean);
    f.running_var = static_cast<A*>(p.running_var);
  }
  stats_finalize_kernel<T><<<grid_1d(num_q, kWarps), kThreads, 0, st>>>(f);
  check_launch("stats_finalize_kernel");
  if (instance_running) {
    const double unbias = static_cast<double>(s) / static_cast<double>(s - 1);
    instance_running_kernel<A><<<grid_1d(c, kThreads), kThreads, 0, st>>>(
        f.mean, group_var.as<A>(), n, c, unbias, p.momentum, static_cast<A*>(p.running_mean),
        static_cast<A*>(p.running_var));
    check_launch("instance_running_kernel");
  }
}

template <class A>
void fold_typed(const FoldForward& p, cudaStream_t st) {
  const i64 n = p.shape.n, c = p.shape.c;
  check_groups(p.per_sample, p.groups, c);
  const i64 cpg = p.per_sample ? c / p.groups : 1;
  const i64 entries = n * c;
  fold_forward_kernel<A><<<grid_1d(entries, kThreads), kThreads, 0, st>>>(
      entries, c, cpg, p.per_sample, static_cast<const A*>(p.mean), static_cast<const A*>(p.rstd),
      static_cast<const A*>(p.weight), static_cast<const A*>(p.bias), static_cast<const A*>(p.style_std),
      static_cast<const A*>(p.style_mean), static_cast<A*>(p.center), static_cast<A*>(p.scale),
      static_cast<A*>(p.shift), static_cast<const A*>(p.mean_lo), static_cast<A*>(p.center_lo));
  check_launch("fold_forward_kernel");
}

template <class T>
void backward_typed(const ChannelBackward& p, cudaStream_t st) {
  using A = acc_t<T>;
  const i64 n = p.shape.n, c = p.shape.c, s = p.shape.s;
  check_groups(p.per_sample, p.groups, c);
  if (!p.per_sample && (p.weight_n_stride != 0 || p.grads_n_stride != 0))
    throw Error(ErrorKind::value, "channel_backward: BatchNorm takes per-channel weights and gradients (strides 0)");
  if ((p.weight_n_stride != 0 && p.weight_n_stride != c) || (p.grads_n_stride != 0 && p.grads_n_stride != c))
    throw Error(ErrorKind::value, "channel_backward: weight_n_stride and grads_n_stride must be 0 or c");
  const i64 groups = p.per_sample ? p.groups : 1;
  const i64 cpg = p.per_sample ? c / groups : 1;
  const i64 num_q = p.per_sample ? n * groups : c;
  const i64 entries = p.per_sample ? n * c : c;
  const i64 table_n_stride = p.per_sample ? c : 0;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  const A* mean = static_cast<const A*>(p.mean);
  const A* rstd = static_cast<const A*>(p.rstd);
  const A* weight = static_cast<const A*>(p.weight);
  A* out_sum_dy = static_cast<A*>(p.sum_dy);
  A* out_sum_dy_xhat = static_cast<A*>(p.sum_dy_xhat);
  const bool want_grads = out_sum_dy || out_sum_dy_xhat;

  Scratch tables(6 * static_cast<std::size_t>(entries) * sizeof(A), st);
  A* center = tables.as<A>();
  A* center_lo = center + entries;
  A* norm_scale = center_lo + entries;
  A* scale = norm_scale + entries;
  A* shift = scale + entries;
  A* dy_scale = shift + entries;

  // Sums (reading x and dy) all complete before the apply writes dx.
  if (!p.constant_stats || want_grads) {
    const bool columns = reduce_as_columns(p.shape, p.per_sample);
    GradGroupArgs<A> g;
    RunSegments rs;
    ColumnTiles ct;
    bool vec;
    i64 partial_count;
    if (!columns) {
      // Per-sample: owners are the planes (one run of s each); BatchNorm: the
      // channels (n runs of s each, c * s apart).
      vec = aligned16(x) && aligned16(dy) && s % kVec<T> == 0;
      const int unit = vec ? kVec<T> : 1;
      rs = p.per_sample ? make_run_segments(n * c, s, 1, s, s, sizeof(T), unit)
                        : make_run_segments(c, s, n, c * s, s, sizeof(T), unit);
      partial_count = rs.total();
      g.per_entry = rs.per_owner;
    } else {
      vec = aligned16(x) && aligned16(dy) && c % kVec<T> == 0;
      ct = make_column_tiles(c, vec ? kVec<T> : 1, p.per_sample ? n : 1, p.per_sample ? s : n * s);
      partial_count = ct.batches * ct.chunks * c;
      g.per_entry = ct.chunks;
    }
    Scratch partials(static_cast<std::size_t>(partial_count) * sizeof(GradSums<A>), st);
    GradSums<A>* part = partials.as<GradSums<A>>();
    if (!columns) {
      const unsigned grid = grid_1d(ceil_div(rs.total(), 32 / rs.lanes), kWarps);
      if (vec)
        segment_grad_sums_kernel<T, kVec<T>><<<grid, kThreads, 0, st>>>(x, dy, rs, FastDiv(cpg), mean, part);
      else
        segment_grad_sums_kernel<T, 1><<<grid, kThreads, 0, st>>>(x, dy, rs, FastDiv(cpg), mean, part);
      check_launch("segment_grad_sums_kernel");
    } else {
      const unsigned grid = grid_1d(ct.items(), 1);
      if (vec)
        column_grad_sums_kernel<T, kVec<T>><<<grid, kThreads, 0, st>>>(x, dy, ct, FastDiv(cpg), groups, mean, part);
      else
        column_grad_sums_kernel<T, 1><<<grid, kThreads, 0, st>>>(x, dy, ct, FastDiv(cpg), groups, mean, part);
      check_launch("column_grad_sums_kernel");
    }

    Scratch entry_sums(2 * static_cast<std::size_t>(entries) * sizeof(double), st);
    g.partials = part;
    g.num_q = num_q;
    g.entries = cpg;
    g.channels_last = columns;
    g.c = c;
    g.groups_div = p.per_sample ? groups : c;
    g.entry_lanes = 32 / pow2_at_least(cpg, 32);
    g.count = p.per_sample ? cpg * s : n * s;
    g.training = !p.constant_stats;
    g.mean = mean;
    g.rstd = rstd;
    g.weight = weight;
    g.weight_n_stride = p.weight_n_stride;
    g.entry_dy = entry_sums.as<double>();
    g.entry_dy_xhat = g.entry_dy + entries;
    if (!p.constant_stats) {
      g.center = center;
      g.center_lo = center_lo;
      g.norm_scale = norm_scale;
      g.scale = scale;
      g.shift = shift;
      g.dy_scale = dy_scale;
    }
    const bool over_samples = p.per_sample && p.grads_n_stride == 0;
    if (!over_samples) {
      g.sum_dy = out_sum_dy;
      g.sum_dy_xhat = out_sum_dy_xhat;
    }
    grad_group_kernel<A><<<grid_1d(num_q, kWarps), kThreads, 0, st>>>(g);
    check_launch("grad_group_kernel");
    if (over_samples && want_grads) {
      sum_over_samples_kernel<A><<<grid_1d(c, kThreads), kThreads, 0, st>>>(g.entry_dy, g.entry_dy_xhat, n, c,
                                                                            out_sum_dy, out_sum_dy_xhat);
      check_launch("sum_over_samples_kernel");
    }
  }

  ApplyArgs<T> a;
  a.y = dx;
  a.center = center;
  a.scale = scale;
  a.shift = shift;
  a.table_n_stride = table_n_stride;
  if (p.constant_stats) {
    constant_stats_table_kernel<A><<<grid_1d(entries, kThreads), kThreads, 0, st>>>(
        entries, c, cpg, p.per_sample, rstd, weight, p.weight_n_stride, center, scale, shift);
    check_launch("constant_stats_table_kernel");
    a.x = dy;  // dx = (dy - 0) * (w * rstd) + 0
  } else {
    a.x = x;
    a.center_lo = center_lo;
    a.norm_scale = norm_scale;
    a.dy = dy;
    a.dy_scale = dy_scale;
  }
  launch_apply<T>(p.shape, a, st);
}

template <class T>
void style_grad_typed(const StyleGrad& p, cudaStream_t st) {
  using A = acc_t<T>;
  const i64 entries = p.shape.n * p.shape.c;
  Scratch tables(3 * static_cast<std::size_t>(entries) * sizeof(A), st);
  A* center = tables.as<A>();
  A* scale = center + entries;
  A* shift = scale + entries;
  style_table_kernel<A><<<grid_1d(entries, kThreads), kThreads, 0, st>>>(
      entries, static_cast<A>(p.shape.s), static_cast<const A*>(p.mean), static_cast<const A*>(p.rstd),
      static_cast<const A*>(p.dmean), static_cast<const A*>(p.dstd), center, scale, shift);
  check_launch("style_table_kernel");
  ApplyArgs<T> a;
  a.x = static_cast<const T*>(p.style);
  a.y = static_cast<T*>(p.dstyle);
  a.center = center;
  a.scale = scale;
  a.shift = shift;
  a.table_n_stride = p.shape.c;
  launch_apply<T>(p.shape, a, st);
}

}  // namespace

void channel_stats(const ChannelStats& p, Stream stream) {
  dispatch_dtype(p.dtype, [&](auto tag) { stats_typed<decltype(tag)>(p, as_cuda(stream)); });
}

void fold_forward(const FoldForward& p, Stream stream) {
  if (p.dtype == DType::float64) fold_typed<double>(p, as_cuda(stream));
  else fold_typed<float>(p, as_cuda(stream));
}

void channel_apply(const ChannelApply& p, Stream stream) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    ApplyArgs<T> a;
    a.x = static_cast<const T*>(p.x);
    a.y = static_cast<T*>(p.y);
    a.center = static_cast<const A*>(p.center);
    a.scale = static_cast<const A*>(p.scale);
    a.shift = static_cast<const A*>(p.shift);
    a.center_lo = static_cast<const A*>(p.center_lo);
    a.dy = static_cast<const T*>(p.dy);
    a.dy_scale = static_cast<const A*>(p.dy_scale);
    a.table_n_stride = p.table_n_stride;
    launch_apply<T>(p.shape, a, as_cuda(stream));
  });
}

void channel_backward(const ChannelBackward& p, Stream stream) {
  dispatch_dtype(p.dtype, [&](auto tag) { backward_typed<decltype(tag)>(p, as_cuda(stream)); });
}

void style_grad(const StyleGrad& p, Stream stream) {
  dispatch_dtype(p.dtype, [&](auto tag) { style_grad_typed<decltype(tag)>(p, as_cuda(stream)); });
}

void convert(const void* src, DType src_dtype, std::int64_t src_stride, void* dst, DType dst_dtype,
             std::int64_t dst_stride, std::int64_t count, Stream stream) {
  if (count <= 0) return;
  convert_kernel<<<grid_1d(count, kThreads), kThreads, 0, as_cuda(stream)>>>(src, src_dtype, src_stride, dst,
                                                                             dst_dtype, dst_stride, count);
  check_launch("convert_kernel");
}

}  // namespace normkit::cuda_kernels
