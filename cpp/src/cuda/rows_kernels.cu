// cuda/rows_kernels.cu - LayerNorm and RMSNorm over rows (see RowsForward and
// RowsBackward in cuda/launch.hpp).
//
// A row is handled whole by one thread group, picked by the row length:
//   warp kernels   cols <= 1024: a group of 1-32 lanes of a warp per row (the
//                  group no wider than the row needs), the row in registers;
//   block kernels  longer rows that fit in registers: a block per row;
//   loop kernels   rows of any length: a block per row that streams the row
//                  from memory twice (statistics, then output).
// Data moves in 16-byte packs (Vec<T>): lane / thread t of a group of G holds
// packs t, t + G, t + 2G, ... of its row (coalesced). A pack is one vector
// access when the row is 16-byte aligned and the pack lies wholly inside the
// row, element by element otherwise, so misaligned data and odd lengths take
// the same kernels.
//
// dweight / dbias are column sums over rows: a separate kernel sums fixed row
// chunks per column into scratch, a second one adds the chunks in order
// (deterministic, no atomics). They read x and dy, so they run before the dx
// kernel unless dx overlaps neither.
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda/common.cuh"

namespace normkit::cuda_kernels {
namespace {

using i64 = std::int64_t;

// ---- tuning -------------------------------------------------------------------
constexpr int kWarpKernelThreads = 128;  // 4 warps per block, each warp 1-32 rows
constexpr i64 kWarpMaxCols = 1024;       // longest row for the warp kernels
constexpr int kWarpMaxPacks = 8;         // packs per lane in the warp kernels
constexpr int kBlockPreferredThreads = 256;
constexpr int kBlockMaxThreads = 512;       // register kernels keep 128 registers per thread
constexpr int kLoopThreads = 512;
constexpr int kFlushPacks = 1024;  // loop kernels restart a thread's running sums this often (two-level sums)
constexpr int kColTile = 32;       // columns per block in the column sums (one warp wide)
constexpr int kColRowThreads = 16;  // rows summed side by side in a column-sum block
constexpr i64 kColMinChunkRows = 64;
constexpr i64 kColTargetBlocks = 1024;
constexpr i64 kColMaxChunks = 1024;

// Most packs per lane the warp kernels need for T (rows of kWarpMaxCols at most).
template <class T>
constexpr int max_warp_packs() {
  const i64 needed = kWarpMaxCols / (32 * kVec<T>);
  return needed < kWarpMaxPacks ? static_cast<int>(needed) : kWarpMaxPacks;
}

// Most packs per thread the block kernels hold (no register spills at 512
// threads: 16-bit data is kept widened to float by the compiler, double is wide).
template <class T>
constexpr int max_block_packs(bool backward) {
  if (backward) return sizeof(T) == 2 ? 4 : 8;  // x and dy
  return sizeof(T) == 4 ? 16 : 8;
}

__host__ __device__ constexpr i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }

// ---- device helpers -------------------------------------------------------------
template <class T>
__device__ __forceinline__ T zero_elem() {
  return from_acc<T>(acc_t<T>(0));
}

template <class T>
__device__ __forceinline__ Vec<T> zero_pack() {
  Vec<T> p;
#pragma unroll
  for (int k = 0; k < kVec<T>; ++k) p.v[k] = zero_elem<T>();
  return p;
}

// The pack of `row` at column `col` (a multiple of kVec); elements past `cols` read as 0.
template <class T>
__device__ __forceinline__ Vec<T> load_pack(const T* row, i64 col, i64 cols, bool vector_ok) {
  if (vector_ok && col + kVec<T> <= cols) return *reinterpret_cast<const Vec<T>*>(row + col);
  Vec<T> p;
#pragma unroll
  for (int k = 0; k < kVec<T>; ++k) p.v[k] = col + k < cols ? row[col + k] : zero_elem<T>();
  return p;
}

// Stores the elements of a pack that lie before `cols`.
template <class T>
__device__ __forceinline__ void store_pack(T* row, i64 col, i64 cols, bool vector_ok, const Vec<T>& p) {
  if (vector_ok && col + kVec<T> <= cols) {
    *reinterpret_cast<Vec<T>*>(row + col) = p;
    return;
  }
#pragma unroll
  for (int k = 0; k < kVec<T>; ++k)
    if (col + k < cols) row[col + k] = p.v[k];
}

// Per-column parameters (accumulation type) for the pack at `col`: one or two
// 16-byte loads when aligned (kVec<T> * sizeof(A) is a multiple of 16).
template <class T>
__device__ __forceinline__ void load_params(const acc_t<T>* __restrict__ param, i64 col, i64 cols, bool vector_ok,
                                            acc_t<T> (&out)[kVec<T>]) {
  using A = acc_t<T>;
  constexpr int kParts = kVec<T> / kVec<A>;
  if (vector_ok && col + kVec<T> <= cols) {
#pragma unroll
    for (int part = 0; part < kParts; ++part) {
      const Vec<A> v = reinterpret_cast<const Vec<A>*>(param + col)[part];
#pragma unroll
      for (int j = 0; j < kVec<A>; ++j) out[part * kVec<A> + j] = v.v[j];
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < kVec<T>; ++k) out[k] = col + k < cols ? param[col + k] : A(0);
}

// Sum over a group of `lanes` lanes (a power of two <= 32, groups aligned in
// the warp); every lane of the group gets it. Fixed xor tree: deterministic.
// All 32 lanes must call it (lanes is uniform over the warp).
template <class A>
__device__ __forceinline__ A group_sum(A v, int lanes) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    if (offset < lanes) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// A thread's running sum in two levels: `local` restarts every kFlushPacks
// packs so that very long rows do not add tiny terms to a huge total.
template <class A>
struct ChunkedSum {
  A total, local;
  bool flushed;
  __device__ ChunkedSum() : total(A(0)), local(A(0)), flushed(false) {}
  __device__ void flush() {
    total = flushed ? total + local : local;
    local = A(0);
    flushed = true;
  }
  __device__ A value() const { return flushed ? total + local : local; }
};

// Moments of one full pack of x - shift (count kVec, a power of two).
template <class T>
__device__ __forceinline__ Moments<acc_t<T>> pack_moments(const Vec<T>& p, acc_t<T> shift) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  A d[V];
  A sum = A(0);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    d[k] = to_acc(p.v[k]) - shift;
    sum += d[k];
  }
  const A mean = sum * (A(1) / A(V));
  A m2 = A(0);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const A e = d[k] - mean;
    m2 += e * e;
  }
  return Moments<A>{A(V), mean, m2};
}

// ---- forward --------------------------------------------------------------------
template <class T>
struct ForwardArgs {
  using A = acc_t<T>;
  const T* x;
  T* y;  // may equal x; null: statistics only
  const A* weight;
  const A* bias;
  A* mean;
  A* rstd;
  i64 rows, cols, x_stride, y_stride;
  A eps;
  bool rms;
  bool x_vector, y_vector, param_vector;  // 16-byte access allowed
};

// y for one pack: ((x - center) - offset) * rstd * w + b. The row mean is
// center + offset with offset small, so data far from 0 keeps its precision.
template <class T>
__device__ __forceinline__ Vec<T> normalize_pack(const Vec<T>& in, acc_t<T> center, acc_t<T> offset, acc_t<T> rstd,
                                                 const ForwardArgs<T>& a, i64 col) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  A w[V] = {}, b[V] = {};
  if (a.weight) load_params<T>(a.weight, col, a.cols, a.param_vector, w);
  if (a.bias) load_params<T>(a.bias, col, a.cols, a.param_vector, b);
  Vec<T> out;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    A t = ((to_acc(in.v[k]) - center) - offset) * rstd;
    if (a.weight) t *= w[k];
    if (a.bias) t += b[k];
    out.v[k] = from_acc<T>(t);
  }
  return out;
}

// Per-row statistics from the sums of the second pass: d = x - center summed
// (sum_d) and squared (sum_d2). LayerNorm: offset = mean(d), M2 corrected for
// it; RMSNorm: center = offset = 0 and M2 = sum of squares.
template <class A>
__device__ __forceinline__ void finish_stats(A sum_d, A sum_d2, A n, A eps, bool rms, A& offset, A& rstd) {
  A m2 = sum_d2;
  offset = A(0);
  if (!rms) {
    offset = sum_d / n;
    m2 = sum_d2 - sum_d * offset;
    if (m2 < A(0)) m2 = A(0);  // rounding only; NaN passes through
  }
  rstd = rsqrt_acc(m2 / n + eps);
}

// A warp holds 32 / lanes rows; lane l of a row's group holds packs
// l, l + lanes, ... (kPacks of them). Two passes over registers: the mean,
// then the deviations from it.
template <class T, int kPacks>
__global__ void __launch_bounds__(kWarpKernelThreads) forward_warp_kernel(ForwardArgs<T> a, int lanes_log2) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int lanes = 1 << lanes_log2;
  const int lane = threadIdx.x & 31;
  const int group_lane = lane & (lanes - 1);
  const i64 rows_per_warp = 32 >> lanes_log2;
  const i64 warps_per_block = blockDim.x >> 5;
  const i64 warp_id = blockIdx.x * warps_per_block + (threadIdx.x >> 5);
  const i64 warp_step = static_cast<i64>(gridDim.x) * warps_per_block * rows_per_warp;
  const int cols = static_cast<int>(a.cols);
  const A n = A(cols);
  // The loop bound is uniform over the warp: every lane reaches the shuffles.
  for (i64 first = warp_id * rows_per_warp; first < a.rows; first += warp_step) {
    const i64 row = first + (lane >> lanes_log2);
    const bool valid = row < a.rows;
    const T* xr = a.x + (valid ? row : first) * a.x_stride;
    Vec<T> pack[kPacks];
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int col = (p * lanes + group_lane) * V;
      pack[p] = valid && col < cols ? load_pack(xr, col, cols, a.x_vector) : zero_pack<T>();
    }
    A center = A(0);
    if (!a.rms) {
      A sum = A(0);  // padding reads as 0
#pragma unroll
      for (int p = 0; p < kPacks; ++p)
#pragma unroll
        for (int k = 0; k < V; ++k) sum += to_acc(pack[p].v[k]);
      center = group_sum(sum, lanes) / n;
    }
    A sum_d = A(0), sum_d2 = A(0);
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int col = (p * lanes + group_lane) * V;
#pragma unroll
      for (int k = 0; k < V; ++k)
        if (col + k < cols) {
          const A d = to_acc(pack[p].v[k]) - center;
          sum_d += d;
          sum_d2 += d * d;
        }
    }
    sum_d2 = group_sum(sum_d2, lanes);
    if (!a.rms) sum_d = group_sum(sum_d, lanes);
    A offset, rstd;
    finish_stats(sum_d, sum_d2, n, a.eps, a.rms, offset, rstd);
    if (valid && group_lane == 0) {
      if (a.mean) a.mean[row] = center + offset;
      if (a.rstd) a.rstd[row] = rstd;
    }
    if (valid && a.y) {
      T* yr = a.y + row * a.y_stride;
#pragma unroll
      for (int p = 0; p < kPacks; ++p) {
        const int col = (p * lanes + group_lane) * V;
        if (col < cols) store_pack(yr, col, cols, a.y_vector, normalize_pack(pack[p], center, offset, rstd, a, col));
      }
    }
  }
}

// A block per row, thread t holding packs t, t + blockDim.x, ... (kPacks).
template <class T, int kPacks>
__global__ void __launch_bounds__(kBlockMaxThreads) forward_block_kernel(ForwardArgs<T> a) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  __shared__ A shared[2 * 32];
  const int cols = static_cast<int>(a.cols);
  const int threads = blockDim.x;
  const A n = A(cols);
  for (i64 row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* xr = a.x + row * a.x_stride;
    Vec<T> pack[kPacks];
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int col = (p * threads + static_cast<int>(threadIdx.x)) * V;
      pack[p] = col < cols ? load_pack(xr, col, cols, a.x_vector) : zero_pack<T>();
    }
    A center = A(0);
    if (!a.rms) {
      A sum[1] = {A(0)};
#pragma unroll
      for (int p = 0; p < kPacks; ++p)
#pragma unroll
        for (int k = 0; k < V; ++k) sum[0] += to_acc(pack[p].v[k]);
      block_sum<1>(sum, shared);
      center = sum[0] / n;
    }
    A sums[2] = {A(0), A(0)};  // d, d^2
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int col = (p * threads + static_cast<int>(threadIdx.x)) * V;
#pragma unroll
      for (int k = 0; k < V; ++k)
        if (col + k < cols) {
          const A d = to_acc(pack[p].v[k]) - center;
          sums[0] += d;
          sums[1] += d * d;
        }
    }
    block_sum<2>(sums, shared);
    A offset, rstd;
    finish_stats(sums[0], sums[1], n, a.eps, a.rms, offset, rstd);
    if (threadIdx.x == 0) {
      if (a.mean) a.mean[row] = center + offset;
      if (a.rstd) a.rstd[row] = rstd;
    }
    if (a.y) {
      T* yr = a.y + row * a.y_stride;
#pragma unroll
      for (int p = 0; p < kPacks; ++p) {
        const int col = (p * threads + static_cast<int>(threadIdx.x)) * V;
        if (col < cols) store_pack(yr, col, cols, a.y_vector, normalize_pack(pack[p], center, offset, rstd, a, col));
      }
    }
  }
}

// A block per row of any length: Welford moments of x - x[0] per thread (a
// pack at a time), merged over the block by Chan's formula, then a second
// pass over memory writes y. Shifting by x[0] keeps data far from 0 precise.
template <class T>
__global__ void __launch_bounds__(kLoopThreads) forward_loop_kernel(ForwardArgs<T> a) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  __shared__ Moments<A> shared_moments[32];
  __shared__ A shared_sums[32];
  const i64 cols = a.cols;
  const i64 packs = ceil_div(cols, V);
  const A n = A(cols);
  for (i64 row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* xr = a.x + row * a.x_stride;
    A center = A(0), offset = A(0), m2 = A(0);
    if (!a.rms) {
      center = to_acc(xr[0]);
      Moments<A> total{A(0), A(0), A(0)}, local{A(0), A(0), A(0)};
      int since_flush = 0;
      for (i64 p = threadIdx.x; p < packs; p += blockDim.x) {
        const i64 col = p * V;
        const Vec<T> v = load_pack(xr, col, cols, a.x_vector);
        if (col + V <= cols) {
          local = chan_merge(local, pack_moments(v, center));
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k)
            if (col + k < cols) welford_add(local, to_acc(v.v[k]) - center);
        }
        // Flushing keeps the float count of `local` exact for any row length.
        if (++since_flush == kFlushPacks) {
          total = chan_merge(total, local);
          local = Moments<A>{A(0), A(0), A(0)};
          since_flush = 0;
        }
      }
      const Moments<A> row_moments = block_merge(chan_merge(total, local), shared_moments);
      offset = row_moments.mean;
      m2 = row_moments.m2;
    } else {
      ChunkedSum<A> squares;
      int since_flush = 0;
      for (i64 p = threadIdx.x; p < packs; p += blockDim.x) {
        const i64 col = p * V;
        const Vec<T> v = load_pack(xr, col, cols, a.x_vector);
#pragma unroll
        for (int k = 0; k < V; ++k)
          if (col + k < cols) {
            const A xv = to_acc(v.v[k]);
            squares.local += xv * xv;
          }
        if (++since_flush == kFlushPacks) {
          squares.flush();
          since_flush = 0;
        }
      }
      A sum[1] = {squares.value()};
      block_sum<1>(sum, shared_sums);
      m2 = sum[0];
    }
    const A rstd = rsqrt_acc(m2 / n + a.eps);
    if (threadIdx.x == 0) {
      if (a.mean) a.mean[row] = center + offset;
      if (a.rstd) a.rstd[row] = rstd;
    }
    if (a.y) {
      T* yr = a.y + row * a.y_stride;
      // Each thread rereads exactly the packs it writes: in place is safe.
      for (i64 p = threadIdx.x; p < packs; p += blockDim.x) {
        const i64 col = p * V;
        const Vec<T> v = load_pack(xr, col, cols, a.x_vector);
        store_pack(yr, col, cols, a.y_vector, normalize_pack(v, center, offset, rstd, a, col));
      }
    }
  }
}

// ---- backward -------------------------------------------------------------------
template <class T>
struct BackwardArgs {
  using A = acc_t<T>;
  const T* x;
  const T* dy;
  T* dx;  // may equal x or dy; null: no dx
  const A* weight;
  const A* mean;  // null for RMSNorm
  const A* rstd;
  A* row_delta;  // when set: the per-row mean correction for the column sums
  i64 rows, cols, x_stride, dy_stride, dx_stride;
  bool rms;
  bool x_vector, dy_vector, dx_vector, param_vector;
};

// Adds one pack's g = dy * w, g * xc and xc (xc = x - center) to the sums.
// The xc sum is formed exactly like in the row_delta kernels (same operations
// in the same order), so both give the same bits.
template <class T>
__device__ __forceinline__ void add_grad_sums(const Vec<T>& xv, const Vec<T>& dyv, acc_t<T> center,
                                              const BackwardArgs<T>& a, i64 col, acc_t<T>& sum_g,
                                              acc_t<T>& sum_g_xc, acc_t<T>& sum_xc) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  A w[V] = {};
  if (a.weight) load_params<T>(a.weight, col, a.cols, a.param_vector, w);
#pragma unroll
  for (int k = 0; k < V; ++k)
    if (col + k < a.cols) {
      const A xc = to_acc(xv.v[k]) - center;
      A g = to_acc(dyv.v[k]);
      if (a.weight) g *= w[k];
      sum_g += g;
      sum_g_xc += g * xc;
      sum_xc += xc;
    }
}

// Per-row coefficients: dx = rstd * g + c1 * xhat + c0 with
// xhat = ((x - center) - delta) * rstd, the exact mean being center + delta.
template <class A>
struct RowGrad {
  A center, delta, rstd, c1, c0;
};

template <class A>
__device__ __forceinline__ RowGrad<A> row_grad(A center, A rstd, A sum_g, A sum_g_xc, A sum_xc, A n, bool rms) {
  RowGrad<A> r;
  r.center = center;
  r.rstd = rstd;
  r.delta = rms ? A(0) : sum_xc / n;
  // sum g * (x - exact mean) = sum_g_xc - delta * sum_g. Scaling by rstd once
  // (never rstd^2, which overflows for rstd > 1.8e19) keeps every term finite.
  const A mean_g_xhat = (sum_g_xc - r.delta * sum_g) * rstd / n;
  r.c1 = -rstd * mean_g_xhat;
  r.c0 = rms ? A(0) : -rstd * (sum_g / n);
  return r;
}

template <class T>
__device__ __forceinline__ Vec<T> grad_pack(const Vec<T>& xv, const Vec<T>& dyv, const RowGrad<acc_t<T>>& r,
                                            const BackwardArgs<T>& a, i64 col) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  A w[V] = {};
  if (a.weight) load_params<T>(a.weight, col, a.cols, a.param_vector, w);
  Vec<T> out;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const A xhat = ((to_acc(xv.v[k]) - r.center) - r.delta) * r.rstd;
    A g = to_acc(dyv.v[k]);
    if (a.weight) g *= w[k];
    out.v[k] = from_acc<T>(g * r.rstd + (r.c1 * xhat + r.c0));
  }
  return out;
}

template <class T>
__device__ __forceinline__ acc_t<T> row_center(const BackwardArgs<T>& a, i64 row) {
  return a.mean ? a.mean[row] : acc_t<T>(0);
}

// Row layout as in forward_warp_kernel; x and dy in registers.
template <class T, int kPacks>
__global__ void __launch_bounds__(kWarpKernelThreads) backward_warp_kernel(BackwardArgs<T> a, int lanes_log2) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int lanes = 1 << lanes_log2;
  const int lane = threadIdx.x & 31;
  const int group_lane = lane & (lanes - 1);
  const i64 rows_per_warp = 32 >> lanes_log2;
  const i64 warps_per_block = blockDim.x >> 5;
  const i64 warp_id = blockIdx.x * warps_per_block + (threadIdx.x >> 5);
  const i64 warp_step = static_cast<i64>(gridDim.x) * warps_per_block * rows_per_warp;
  const int cols = static_cast<int>(a.cols);
  const A n = A(cols);
  for (i64 first = warp_id * rows_per_warp; first < a.rows; first += warp_step) {
    const i64 row = first + (lane >> lanes_log2);
    const bool valid = row < a.rows;
    const i64 r = valid ? row : first;
    const T* xr = a.x + r * a.x_stride;
    const T* dyr = a.dy + r * a.dy_stride;
    Vec<T> xp[kPacks], dyp[kPacks];
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int col = (p * lanes + group_lane) * V;
      if (valid && col < cols) {
        xp[p] = load_pack(xr, col, cols, a.x_vector);
        dyp[p] = load_pack(dyr, col, cols, a.dy_vector);
      } else {
        xp[p] = zero_pack<T>();
        dyp[p] = zero_pack<T>();
      }
    }
    const A center = row_center(a, r);
    A sum_g = A(0), sum_g_xc = A(0), sum_xc = A(0);
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int col = (p * lanes + group_lane) * V;
      if (col < cols) add_grad_sums(xp[p], dyp[p], center, a, col, sum_g, sum_g_xc, sum_xc);
    }
    sum_g = group_sum(sum_g, lanes);
    sum_g_xc = group_sum(sum_g_xc, lanes);
    if (!a.rms) sum_xc = group_sum(sum_xc, lanes);
    const RowGrad<A> g = row_grad(center, a.rstd[r], sum_g, sum_g_xc, sum_xc, n, a.rms);
    if (valid && group_lane == 0 && a.row_delta) a.row_delta[row] = g.delta;
    if (valid && a.dx) {
      T* dxr = a.dx + row * a.dx_stride;
#pragma unroll
      for (int p = 0; p < kPacks; ++p) {
        const int col = (p * lanes + group_lane) * V;
        if (col < cols) store_pack(dxr, col, cols, a.dx_vector, grad_pack(xp[p], dyp[p], g, a, col));
      }
    }
  }
}

template <class T, int kPacks>
__global__ void __launch_bounds__(kBlockMaxThreads) backward_block_kernel(BackwardArgs<T> a) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  __shared__ A shared[3 * 32];
  const int cols = static_cast<int>(a.cols);
  const int threads = blockDim.x;
  const A n = A(cols);
  for (i64 row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* xr = a.x + row * a.x_stride;
    const T* dyr = a.dy + row * a.dy_stride;
    Vec<T> xp[kPacks], dyp[kPacks];
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int col = (p * threads + static_cast<int>(threadIdx.x)) * V;
      if (col < cols) {
        xp[p] = load_pack(xr, col, cols, a.x_vector);
        dyp[p] = load_pack(dyr, col, cols, a.dy_vector);
      } else {
        xp[p] = zero_pack<T>();
        dyp[p] = zero_pack<T>();
      }
    }
    const A center = row_center(a, row);
    A sums[3] = {A(0), A(0), A(0)};  // g, g * xc, xc
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int col = (p * threads + static_cast<int>(threadIdx.x)) * V;
      if (col < cols) add_grad_sums(xp[p], dyp[p], center, a, col, sums[0], sums[1], sums[2]);
    }
    block_sum<3>(sums, shared);
    const RowGrad<A> g = row_grad(center, a.rstd[row], sums[0], sums[1], sums[2], n, a.rms);
    if (threadIdx.x == 0 && a.row_delta) a.row_delta[row] = g.delta;
    if (a.dx) {
      T* dxr = a.dx + row * a.dx_stride;
#pragma unroll
      for (int p = 0; p < kPacks; ++p) {
        const int col = (p * threads + static_cast<int>(threadIdx.x)) * V;
        if (col < cols) store_pack(dxr, col, cols, a.dx_vector, grad_pack(xp[p], dyp[p], g, a, col));
      }
    }
  }
}

// A block per row of any length: sums over memory, then dx from a second pass.
template <class T>
__global__ void __launch_bounds__(kLoopThreads) backward_loop_kernel(BackwardArgs<T> a) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  __shared__ A shared[3 * 32];
  const i64 cols = a.cols;
  const i64 packs = ceil_div(cols, V);
  const A n = A(cols);
  for (i64 row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* xr = a.x + row * a.x_stride;
    const T* dyr = a.dy + row * a.dy_stride;
    const A center = row_center(a, row);
    ChunkedSum<A> sum_g, sum_g_xc, sum_xc;
    int since_flush = 0;
    for (i64 p = threadIdx.x; p < packs; p += blockDim.x) {
      const i64 col = p * V;
      const Vec<T> xv = load_pack(xr, col, cols, a.x_vector);
      const Vec<T> dyv = load_pack(dyr, col, cols, a.dy_vector);
      add_grad_sums(xv, dyv, center, a, col, sum_g.local, sum_g_xc.local, sum_xc.local);
      if (++since_flush == kFlushPacks) {
        sum_g.flush();
        sum_g_xc.flush();
        sum_xc.flush();
        since_flush = 0;
      }
    }
    A sums[3] = {sum_g.value(), sum_g_xc.value(), sum_xc.value()};
    block_sum<3>(sums, shared);  // also orders every read of the row before the writes below
    const RowGrad<A> g = row_grad(center, a.rstd[row], sums[0], sums[1], sums[2], n, a.rms);
    if (threadIdx.x == 0 && a.row_delta) a.row_delta[row] = g.delta;
    if (a.dx) {
      T* dxr = a.dx + row * a.dx_stride;
      for (i64 p = threadIdx.x; p < packs; p += blockDim.x) {
        const i64 col = p * V;
        const Vec<T> xv = load_pack(xr, col, cols, a.x_vector);
        const Vec<T> dyv = load_pack(dyr, col, cols, a.dy_vector);
        store_pack(dxr, col, cols, a.dx_vector, grad_pack(xv, dyv, g, a, col));
      }
    }
  }
}

// ---- row mean corrections ahead of the column sums --------------------------------
// delta[row] = mean(x - mean[row]) with the thread layout, summation order and
// tree of the dx kernel the same plan picks, so the column sums and dx use the
// same bits whichever runs first.

// Sum of x - center over a group thread's packs first, first + step, ...
template <class T>
__device__ __forceinline__ acc_t<T> thread_deviation_sum(const T* xr, acc_t<T> center, i64 cols, bool x_vector,
                                                         i64 first, i64 step) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const i64 packs = ceil_div(cols, V);
  ChunkedSum<A> sum_xc;
  int since_flush = 0;
  for (i64 p = first; p < packs; p += step) {
    const i64 col = p * V;
    const Vec<T> xv = load_pack(xr, col, cols, x_vector);
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (col + k < cols) {
        const A xc = to_acc(xv.v[k]) - center;
        sum_xc.local += xc;
      }
    if (++since_flush == kFlushPacks) {
      sum_xc.flush();
      since_flush = 0;
    }
  }
  return sum_xc.value();
}

template <class T>
__global__ void __launch_bounds__(kWarpKernelThreads) row_delta_warp_kernel(BackwardArgs<T> a, int lanes_log2) {
  using A = acc_t<T>;
  const int lanes = 1 << lanes_log2;
  const int lane = threadIdx.x & 31;
  const int group_lane = lane & (lanes - 1);
  const i64 rows_per_warp = 32 >> lanes_log2;
  const i64 warps_per_block = blockDim.x >> 5;
  const i64 warp_id = blockIdx.x * warps_per_block + (threadIdx.x >> 5);
  const i64 warp_step = static_cast<i64>(gridDim.x) * warps_per_block * rows_per_warp;
  const A n = A(a.cols);
  for (i64 first = warp_id * rows_per_warp; first < a.rows; first += warp_step) {
    const i64 row = first + (lane >> lanes_log2);
    const bool valid = row < a.rows;
    A sum_xc = A(0);
    if (valid)
      sum_xc = thread_deviation_sum(a.x + row * a.x_stride, row_center(a, row), a.cols, a.x_vector, group_lane, lanes);
    sum_xc = group_sum(sum_xc, lanes);
    if (valid && group_lane == 0) a.row_delta[row] = sum_xc / n;
  }
}

template <class T>
__global__ void __launch_bounds__(kLoopThreads) row_delta_block_kernel(BackwardArgs<T> a) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  const A n = A(a.cols);
  for (i64 row = blockIdx.x; row < a.rows; row += gridDim.x) {
    A sum[1] = {thread_deviation_sum(a.x + row * a.x_stride, row_center(a, row), a.cols, a.x_vector,
                                     static_cast<i64>(threadIdx.x), static_cast<i64>(blockDim.x))};
    block_sum<1>(sum, shared);
    if (threadIdx.x == 0) a.row_delta[row] = sum[0] / n;
  }
}

// ---- column sums: dweight, dbias ------------------------------------------------
template <class T>
struct ColumnArgs {
  using A = acc_t<T>;
  const T* x;
  const T* dy;
  const A* mean;   // null: 0 (RMSNorm)
  const A* delta;  // null: 0
  const A* rstd;
  i64 rows, cols, x_stride, dy_stride;
};

// Adds the kColRowThreads partial sums of each column in row order; thread
// (tx, 0) writes column tile * kColTile + tx. Shared as [2][kColRowThreads][kColTile + 1].
template <class A>
__device__ __forceinline__ void reduce_column_tile(A sum_dw, A sum_db, A (*shared)[kColRowThreads][kColTile + 1],
                                                   bool in_range, A* out_dw, A* out_db, i64 index) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  shared[0][ty][tx] = sum_dw;
  shared[1][ty][tx] = sum_db;
  __syncthreads();
  if (ty == 0 && in_range) {
    A dw = shared[0][0][tx], db = shared[1][0][tx];
#pragma unroll
    for (int j = 1; j < kColRowThreads; ++j) {
      dw += shared[0][j][tx];
      db += shared[1][j][tx];
    }
    if (out_dw) out_dw[index] = dw;
    if (out_db) out_db[index] = db;
  }
  __syncthreads();  // shared is reused by the next tile
}

// Block (tile, chunk): for each column of the tile, sums over the chunk's rows
// of dy * xhat and dy into out_*[chunk * cols + col] (either may be null).
template <class T>
__global__ void __launch_bounds__(kColTile* kColRowThreads)
    column_partials_kernel(ColumnArgs<T> c, i64 chunk_rows, acc_t<T>* out_dw, acc_t<T>* out_db) {
  using A = acc_t<T>;
  __shared__ A shared[2][kColRowThreads][kColTile + 1];
  const i64 tiles = ceil_div(c.cols, kColTile);
  const i64 row_begin = static_cast<i64>(blockIdx.y) * chunk_rows;
  const i64 row_end = row_begin + chunk_rows < c.rows ? row_begin + chunk_rows : c.rows;
  for (i64 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const i64 col = tile * kColTile + threadIdx.x;
    const bool in_range = col < c.cols;
    A sum_dw = A(0), sum_db = A(0);
    if (in_range) {
#pragma unroll 4
      for (i64 r = row_begin + threadIdx.y; r < row_end; r += kColRowThreads) {
        const A d = to_acc(c.dy[r * c.dy_stride + col]);
        sum_db += d;
        if (out_dw) {
          const A center = c.mean ? c.mean[r] : A(0);
          const A delta = c.delta ? c.delta[r] : A(0);
          const A xhat = ((to_acc(c.x[r * c.x_stride + col]) - center) - delta) * c.rstd[r];
          sum_dw += d * xhat;
        }
      }
    }
    reduce_column_tile<A>(sum_dw, sum_db, shared, in_range, out_dw, out_db,
                          static_cast<i64>(blockIdx.y) * c.cols + col);
  }
}

// out[col] = sum over chunks, in chunk order per row thread, then the row threads in order.
template <class A>
__global__ void __launch_bounds__(kColTile* kColRowThreads)
    column_finish_kernel(const A* __restrict__ partial_dw, const A* __restrict__ partial_db, i64 chunks, i64 cols,
                         A* __restrict__ out_dw, A* __restrict__ out_db) {
  __shared__ A shared[2][kColRowThreads][kColTile + 1];
  const i64 tiles = ceil_div(cols, kColTile);
  for (i64 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const i64 col = tile * kColTile + threadIdx.x;
    const bool in_range = col < cols;
    A sum_dw = A(0), sum_db = A(0);
    if (in_range)
      for (i64 q = threadIdx.y; q < chunks; q += kColRowThreads) {
        if (out_dw) sum_dw += partial_dw[q * cols + col];
        if (out_db) sum_db += partial_db[q * cols + col];
      }
    reduce_column_tile<A>(sum_dw, sum_db, shared, in_range, out_dw, out_db, col);
  }
}

// ---- host side -------------------------------------------------------------------
enum class RowKernel { warp, block, loop };

struct RowPlan {
  RowKernel kind = RowKernel::loop;
  int packs = 0;       // per lane / thread (warp and block kernels)
  int lanes_log2 = 5;  // warp kernels: lanes per row
  int threads = kLoopThreads;  // block size
};

// The kernel for rows of `cols` elements, kVec = vec; fixed by the shape alone.
RowPlan plan_rows(i64 cols, int vec, int max_block_packs) {
  const i64 packs = ceil_div(cols, vec);
  RowPlan plan;
  if (cols <= kWarpMaxCols && packs <= 32 * kWarpMaxPacks) {
    plan.kind = RowKernel::warp;
    plan.threads = kWarpKernelThreads;
    if (packs <= 32) {  // one pack per lane, as few lanes as the row needs
      plan.packs = 1;
      plan.lanes_log2 = 0;
      while ((i64(1) << plan.lanes_log2) < packs) ++plan.lanes_log2;
    } else {
      plan.packs = 2;
      while (32 * i64(plan.packs) < packs) plan.packs *= 2;
      plan.lanes_log2 = 5;
    }
    return plan;
  }
  auto round_up_warp = [](i64 threads) { return static_cast<int>(ceil_div(threads, 32) * 32); };
  for (int p = 2; p <= max_block_packs; p *= 2)
    if (ceil_div(packs, p) <= kBlockPreferredThreads) {
      plan.kind = RowKernel::block;
      plan.packs = p;
      plan.threads = round_up_warp(ceil_div(packs, p));
      return plan;
    }
  if (ceil_div(packs, max_block_packs) <= kBlockMaxThreads) {
    plan.kind = RowKernel::block;
    plan.packs = max_block_packs;
    plan.threads = round_up_warp(ceil_div(packs, max_block_packs));
    return plan;
  }
  return plan;  // loop
}

// Calls f(std::integral_constant<int, P>) for the P among kPacks equal to `packs`.
template <int... kPacks, class F>
void dispatch_packs(int packs, F&& f) {
  const bool called = ((packs == kPacks ? (f(std::integral_constant<int, kPacks>{}), true) : false) || ...);
  if (!called) throw Error(ErrorKind::runtime, "rows kernels: no kernel for " + std::to_string(packs) + " packs");
}

[[noreturn]] void unreachable_plan() { throw Error(ErrorKind::runtime, "rows kernels: inconsistent launch plan"); }

// Rows of `base` allow 16-byte packs: aligned base, and a row stride that keeps
// every row aligned (or a single row).
bool vector_rows_ok(const void* base, i64 row_stride, i64 rows, int vec) {
  return aligned16(base) && (rows == 1 || row_stride % vec == 0);
}

// Whether the rows of two tensors may share memory.
bool rows_overlap(const void* a, i64 a_stride, const void* b, i64 b_stride, i64 rows, i64 cols, std::size_t elem) {
  auto span = [&](const void* p, i64 stride, std::uintptr_t& lo, std::uintptr_t& hi) {
    const i64 last = (rows - 1) * stride;
    const i64 first_elem = last < 0 ? last : 0, end_elem = (last > 0 ? last : 0) + cols;
    const auto base = reinterpret_cast<std::uintptr_t>(p);
    lo = base + static_cast<std::uintptr_t>(first_elem * static_cast<i64>(elem));
    hi = base + static_cast<std::uintptr_t>(end_elem * static_cast<i64>(elem));
  };
  std::uintptr_t a_lo, a_hi, b_lo, b_hi;
  span(a, a_stride, a_lo, a_hi);
  span(b, b_stride, b_lo, b_hi);
  return a_lo < b_hi && b_lo < a_hi;
}

template <class T>
void launch_forward(const RowsForward& p, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  ForwardArgs<T> a;
  a.x = static_cast<const T*>(p.x);
  a.y = static_cast<T*>(p.y);
  a.weight = static_cast<const A*>(p.weight);
  a.bias = p.rms ? nullptr : static_cast<const A*>(p.bias);
  a.mean = p.rms ? nullptr : static_cast<A*>(p.mean);
  a.rstd = static_cast<A*>(p.rstd);
  a.rows = p.rows;
  a.cols = p.cols;
  a.x_stride = p.x_row_stride;
  a.y_stride = p.y_row_stride;
  a.eps = static_cast<A>(p.eps);
  a.rms = p.rms;
  a.x_vector = vector_rows_ok(p.x, p.x_row_stride, p.rows, V);
  a.y_vector = vector_rows_ok(p.y, p.y_row_stride, p.rows, V);
  a.param_vector = aligned16(a.weight) && aligned16(a.bias);

  const RowPlan plan = plan_rows(p.cols, V, max_block_packs<T>(false));
  switch (plan.kind) {
    case RowKernel::warp: {
      const int rows_per_block = (kWarpKernelThreads / 32) * (32 >> plan.lanes_log2);
      const unsigned grid = grid_1d(p.rows, rows_per_block);
      dispatch_packs<1, 2, 4, 8>(plan.packs, [&](auto packs) {
        constexpr int P = decltype(packs)::value;
        if constexpr (P <= max_warp_packs<T>()) {
          forward_warp_kernel<T, P><<<grid, kWarpKernelThreads, 0, stream>>>(a, plan.lanes_log2);
          check_launch("forward_warp_kernel");
        } else {
          unreachable_plan();
        }
      });
      return;
    }
    case RowKernel::block: {
      const unsigned grid = grid_1d(p.rows, 1);
      dispatch_packs<2, 4, 8, 16>(plan.packs, [&](auto packs) {
        constexpr int P = decltype(packs)::value;
        if constexpr (P <= max_block_packs<T>(false)) {
          forward_block_kernel<T, P><<<grid, plan.threads, 0, stream>>>(a);
          check_launch("forward_block_kernel");
        } else {
          unreachable_plan();
        }
      });
      return;
    }
    case RowKernel::loop:
      forward_loop_kernel<T><<<grid_1d(p.rows, 1), kLoopThreads, 0, stream>>>(a);
      check_launch("forward_loop_kernel");
      return;
  }
}

// The dx kernel of `plan` (also writes a.row_delta when set).
template <class T>
void launch_backward_rows(const BackwardArgs<T>& a, const RowPlan& plan, cudaStream_t stream) {
  switch (plan.kind) {
    case RowKernel::warp: {
      const int rows_per_block = (kWarpKernelThreads / 32) * (32 >> plan.lanes_log2);
      const unsigned grid = grid_1d(a.rows, rows_per_block);
      dispatch_packs<1, 2, 4, 8>(plan.packs, [&](auto packs) {
        constexpr int P = decltype(packs)::value;
        if constexpr (P <= max_warp_packs<T>()) {
          backward_warp_kernel<T, P><<<grid, kWarpKernelThreads, 0, stream>>>(a, plan.lanes_log2);
          check_launch("backward_warp_kernel");
        } else {
          unreachable_plan();
        }
      });
      return;
    }
    case RowKernel::block: {
      const unsigned grid = grid_1d(a.rows, 1);
      dispatch_packs<2, 4, 8>(plan.packs, [&](auto packs) {
        constexpr int P = decltype(packs)::value;
        if constexpr (P <= max_block_packs<T>(true)) {
          backward_block_kernel<T, P><<<grid, plan.threads, 0, stream>>>(a);
          check_launch("backward_block_kernel");
        } else {
          unreachable_plan();
        }
      });
      return;
    }
    case RowKernel::loop:
      backward_loop_kernel<T><<<grid_1d(a.rows, 1), kLoopThreads, 0, stream>>>(a);
      check_launch("backward_loop_kernel");
      return;
  }
}

// a.row_delta for every row, the way the dx kernel of `plan` forms it.
template <class T>
void launch_row_delta(const BackwardArgs<T>& a, const RowPlan& plan, cudaStream_t stream) {
  if (plan.kind == RowKernel::warp) {
    const int rows_per_block = (kWarpKernelThreads / 32) * (32 >> plan.lanes_log2);
    row_delta_warp_kernel<T><<<grid_1d(a.rows, rows_per_block), kWarpKernelThreads, 0, stream>>>(a, plan.lanes_log2);
    check_launch("row_delta_warp_kernel");
  } else {
    row_delta_block_kernel<T><<<grid_1d(a.rows, 1), plan.threads, 0, stream>>>(a);
    check_launch("row_delta_block_kernel");
  }
}

// dweight / dbias (either may be null): chunks of rows fixed by the shape,
// partial sums per chunk in scratch, then merged in chunk order.
template <class T>
void launch_column_sums(const ColumnArgs<T>& c, acc_t<T>* dweight, acc_t<T>* dbias, cudaStream_t stream) {
  using A = acc_t<T>;
  const i64 tiles = ceil_div(c.cols, kColTile);
  i64 chunks = ceil_div(kColTargetBlocks, tiles);
  const i64 chunks_by_rows = ceil_div(c.rows, kColMinChunkRows);
  if (chunks > chunks_by_rows) chunks = chunks_by_rows;
  if (chunks > kColMaxChunks) chunks = kColMaxChunks;
  if (chunks < 1) chunks = 1;
  const i64 chunk_rows = ceil_div(c.rows, chunks);
  chunks = ceil_div(c.rows, chunk_rows);

  const dim3 block(kColTile, kColRowThreads);
  const unsigned tile_grid = grid_1d(tiles, 1, 1LL << 30);
  if (chunks == 1) {
    column_partials_kernel<T><<<dim3(tile_grid, 1), block, 0, stream>>>(c, chunk_rows, dweight, dbias);
    check_launch("column_partials_kernel");
    return;
  }
  const i64 per_output = chunks * c.cols;
  Scratch partial(static_cast<std::size_t>(per_output) * ((dweight ? 1 : 0) + (dbias ? 1 : 0)) * sizeof(A), stream);
  A* partial_dw = dweight ? partial.as<A>() : nullptr;
  A* partial_db = dbias ? partial.as<A>() + (dweight ? per_output : 0) : nullptr;
  column_partials_kernel<T>
      <<<dim3(tile_grid, static_cast<unsigned>(chunks)), block, 0, stream>>>(c, chunk_rows, partial_dw, partial_db);
  check_launch("column_partials_kernel");
  column_finish_kernel<A><<<tile_grid, block, 0, stream>>>(partial_dw, partial_db, chunks, c.cols, dweight, dbias);
  check_launch("column_finish_kernel");
}

template <class T>
void launch_backward(const RowsBackward& p, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  BackwardArgs<T> a;
  a.x = static_cast<const T*>(p.x);
  a.dy = static_cast<const T*>(p.dy);
  a.dx = static_cast<T*>(p.dx);
  a.weight = static_cast<const A*>(p.weight);
  a.mean = p.rms ? nullptr : static_cast<const A*>(p.mean);
  a.rstd = static_cast<const A*>(p.rstd);
  a.row_delta = nullptr;
  a.rows = p.rows;
  a.cols = p.cols;
  a.x_stride = p.x_row_stride;
  a.dy_stride = p.dy_row_stride;
  a.dx_stride = p.dx_row_stride;
  a.rms = p.rms;
  a.x_vector = vector_rows_ok(p.x, p.x_row_stride, p.rows, V);
  a.dy_vector = vector_rows_ok(p.dy, p.dy_row_stride, p.rows, V);
  a.dx_vector = vector_rows_ok(p.dx, p.dx_row_stride, p.rows, V);
  a.param_vector = aligned16(a.weight);
  const RowPlan plan = plan_rows(p.cols, V, max_block_packs<T>(true));

  A* dweight = static_cast<A*>(p.dweight);
  A* dbias = static_cast<A*>(p.dbias);
  if (!dweight && !dbias) {
    if (a.dx) launch_backward_rows(a, plan, stream);
    return;
  }
  ColumnArgs<T> c;
  c.x = a.x;
  c.dy = a.dy;
  c.mean = a.mean;
  c.delta = nullptr;
  c.rstd = a.rstd;
  c.rows = p.rows;
  c.cols = p.cols;
  c.x_stride = p.x_row_stride;
  c.dy_stride = p.dy_row_stride;

  // dweight of LayerNorm needs each row's mean correction, which the dx kernel
  // finds on its way; when dx overwrites x or dy, it must run last, so a
  // separate pass over x finds the corrections first.
  const bool need_delta = dweight && !p.rms;
  Scratch delta(need_delta ? static_cast<std::size_t>(p.rows) * sizeof(A) : 0, stream);
  if (need_delta) c.delta = delta.as<A>();
  const std::size_t elem = sizeof(T);
  const bool dx_last = a.dx && (rows_overlap(p.dx, p.dx_row_stride, p.x, p.x_row_stride, p.rows, p.cols, elem) ||
                                rows_overlap(p.dx, p.dx_row_stride, p.dy, p.dy_row_stride, p.rows, p.cols, elem));
  if (need_delta && a.dx && !dx_last) {
    BackwardArgs<T> with_delta = a;
    with_delta.row_delta = delta.as<A>();
    launch_backward_rows(with_delta, plan, stream);
    launch_column_sums(c, dweight, dbias, stream);
    return;
  }
  if (need_delta) {
    BackwardArgs<T> with_delta = a;
    with_delta.row_delta = delta.as<A>();
    launch_row_delta(with_delta, plan, stream);
  }
  launch_column_sums(c, dweight, dbias, stream);
  if (a.dx) launch_backward_rows(a, plan, stream);
}

}  // namespace

void rows_forward(const RowsForward& p, Stream stream) {
  dispatch_dtype(p.dtype, [&](auto tag) { launch_forward<decltype(tag)>(p, as_cuda(stream)); });
}

void rows_backward(const RowsBackward& p, Stream stream) {
  dispatch_dtype(p.dtype, [&](auto tag) { launch_backward<decltype(tag)>(p, as_cuda(stream)); });
}

}  // namespace normkit::cuda_kernels
