// kernels/kernel_api.hpp - the contract between the core and the per-ISA kernels.
//
// The core (plans, validation, dispatch) turns a norm call into one of a few
// canonical problems, described here with plain pointers and extents, and
// hands it to the kernel table of the active instruction set. Nothing in this
// header is ISA-specific, so it is safe to include everywhere.
#pragma once

#include <cstdint>

#include "normkit/dtype.hpp"
#include "normkit/fused.hpp"

// For the per-vector lambdas of the kernels, called from several loops (and
// the store stage's tile loop): a call per vector would cost more than its work.
#if defined(__GNUC__) || defined(__clang__)
#define NORMKIT_ALWAYS_INLINE __attribute__((always_inline))
#else
#define NORMKIT_ALWAYS_INLINE
#endif

namespace normkit::kernels {

// ---- the stages every forward problem shares ---------------------------------
// A forward kernel is a load stage (where a row's values come from), the
// statistics, and a store stage (what happens to each normalized, affine value
// before its single store). Both stages are small policies chosen per problem,
// outside the inner loops: a new epilogue is a new policy, not a new kernel.

// Store stage: y = convert(activation(v)), v = the affine of the normalized
// value in the accumulation type. The plain stage (no activation, output in
// x's dtype) is the kernels' direct path; any other goes through a small tile
// in L1 (kernels/store_stage.inc).
struct StoreStage {
  Activation activation = Activation::none;
  // Of y: x's dtype, or int8 / float8_e4m3 (quantized: q = rne(v / scale), saturated).
  DType out_dtype = DType::float32;
  bool quantized = false;
  double scale = 1;  // static quantization scale (> 0)
  // Rows problems only, optional: dynamic quantization, one float32 scale per
  // row written here (max finite |v| over the row / qmax; 1 for a row of zeros).
  float* row_scales = nullptr;
};

// Load stage of a rows problem: x itself, or s = x + residual (+ bias)
// computed in the accumulation type, stored once in x's dtype into `sum`; the
// statistics and the output then read s as stored (so the fused call equals
// the plain norm of the returned s).
struct RowsResidual {
  const void* residual = nullptr;  // null: no residual add (the plain load)
  std::int64_t residual_row_stride = 0;
  std::int64_t residual_rows = 1;  // row r of x adds residual row r % residual_rows
  const void* bias = nullptr;      // per column, or null; the dtype weight has
  void* sum = nullptr;             // required with residual: x's dtype
  std::int64_t sum_row_stride = 0;
};

// Which statistic a rows problem normalizes with.
enum class RowsNorm : std::uint8_t {
  layer,        // subtract the mean, divide by the standard deviation
  rms,          // divide by the root mean square
  scale_shift,  // statistics known: y = x * weight[p] + bias[p] (per segment)
};

// The optional terms of the apply step with known statistics (the "scale_shift"
// rows problem and the columns apply), in stats_dtype(dtype), per segment entry
// (rows) or per table entry (columns):
//   y = (x - center) * scale + shift [+ dy * dy_scale]
// The centre is the mean rounded to stats_dtype (x - center is exact for x near
// it, so a large mean costs no precision); the planner folds the rest of the
// mean into shift, in double. It may be absent: the folded y = x * scale + shift.
// The dy term is the channel norms' backward (dx from one pass); dy has x's
// dtype and layout.
struct ApplyTerms {
  const void* center = nullptr;
  const void* dy = nullptr;
  std::int64_t dy_row_stride = 0;  // rows problems
  const void* dy_scale = nullptr;
};

// The "rows" pattern: `rows` independent rows of `cols` contiguous elements.
// Serves LayerNorm and RMSNorm (affine per column) and the channels-first
// instance/group norms, AdaIN and folded BatchNorm inference (affine per
// segment). Statistics per row.
//
// Affine per segment (segments > 0): a row is `segments` equal runs; run j of
// row r uses weight/bias entry (r % param_period) * segments + j.
struct RowsForward {
  RowsNorm norm = RowsNorm::layer;
  DType dtype = DType::float32;  // of x and y
  // weight/bias are float32 (16-bit x); else of `dtype`. The kernels take only
  // float32 parameters for 16-bit x: plan::dispatch_rows widens them.
  bool params_float32 = false;
  std::int64_t rows = 0;
  std::int64_t cols = 0;          // > 0
  const void* x = nullptr;
  std::int64_t x_row_stride = 0;  // elements between row starts
  void* y = nullptr;               // null: statistics only
  std::int64_t y_row_stride = 0;
  std::int64_t segments = 0;      // 0: affine per column
  std::int64_t param_period = 1;  // see above
  const void* weight = nullptr;  // per column or per segment entry, or null (scale_shift: the scales)
  const void* bias = nullptr;    // likewise, or null; unused for rms (scale_shift: the shifts)
  ApplyTerms apply;              // scale_shift only: centre tables, the backward's dy term
  void* mean = nullptr;          // `rows` elements of stats_dtype(dtype) or null (layer only)
  void* rstd = nullptr;          // `rows` elements of stats_dtype(dtype) or null
  // For the core's merges (layer only), optional: per-row mean and biased
  // variance in double, the mean formed from shift + offset without rounding
  // to the stats dtype (a large common mean would otherwise lose its low bits).
  double* mean_f64 = nullptr;
  double* var_f64 = nullptr;
  double eps = 1e-5;
  RowsResidual load;              // plain x, or the residual add
  StoreStage store;               // plain (out_dtype = dtype), or an epilogue
  bool streaming_stores = false;  // write y (and s) around the caches (large outputs)
  // scale_shift after a statistics pass over the same x: rows last first (see rows.inc).
  bool last_first = false;
  int threads = 1;                // OpenMP threads to use (1: stay on the caller's thread)
};

// The "columns" pattern, statistics: `batches` x `rows` x `cols` contiguous
// elements (x[b, m, c] at (b * rows + m) * cols + c). The rows of each batch
// are cut into blocks of `block_rows`; block k of batch b writes its per-column
// mean and M2 to partial_mean / partial_m2 [(b * blocks + k) * cols + c].
struct ColumnsStats {
  DType dtype = DType::float32;
  std::int64_t batches = 0, rows = 0, cols = 0, block_rows = 1;
  // Elements from one row of x to the next (0: cols, rows contiguous); a wider
  // pitch reads a band of `cols` columns out of longer rows (x[b, m, c] at
  // (b * rows + m) * row_pitch + c).
  std::int64_t row_pitch = 0;
  const void* x = nullptr;
  double* partial_mean = nullptr;
  double* partial_m2 = nullptr;
  int threads = 1;
  // Only units (batch, block) [unit_begin, unit_end) (unit_end < 0: all): a
  // plan running its own team gives each thread its share.
  std::int64_t unit_begin = 0, unit_end = -1;
};

// The "columns" pattern, output: y = (x - center) * scale + shift (ApplyTerms)
// with tables in stats_dtype(dtype), `table_stride` entries per batch: entry
// j of batch b is column j % cols, for j < cols + kColumnsTablePad (the kernel
// reads a full vector from any column). Center tables may be null (the folded form).
constexpr std::int64_t kColumnsTablePad = 16;  // >= the widest vector's lanes
struct ColumnsApply {
  DType dtype = DType::float32;
  std::int64_t batches = 0, rows = 0, cols = 0;
  std::int64_t block_rows = 1;  // rows per unit of work (units never cross a batch)
  std::int64_t table_stride = 0;  // >= cols + kColumnsTablePad
  // Elements from one row to the next in x, dy and y (0: cols), as for
  // ColumnsStats: a wider pitch applies a band of `cols` columns out of longer
  // rows, a few rows per load of the tables (columns_apply_band; streaming_stores
  // then only for an epilogue's rows).
  std::int64_t row_pitch = 0;
  const void* x = nullptr;
  void* y = nullptr;
  const void* scale = nullptr;
  const void* shift = nullptr;
  ApplyTerms apply;  // centre tables and dy term, tables like scale (dy_row_stride unused)
  StoreStage store;  // plain, or an epilogue (no dynamic scales)
  bool streaming_stores = false;
  bool last_first = false;  // after a statistics pass over the same x (see columns.inc)
  int threads = 1;
  // Only units (batch, block) [unit_begin, unit_end) (unit_end < 0: all), as for ColumnsStats.
  std::int64_t unit_begin = 0, unit_end = -1;
};

// The "rows" pattern, backward: gradients of LayerNorm / RMSNorm (affine per
// column) and of channels-first InstanceNorm / GroupNorm / AdaIN (affine per
// segment), and BatchNorm's channels-first reduction (sums only).
// Row r has statistics mean[r] (layer; none for rms) and rstd[r]; with
// xc = x - mean[r] (x for rms) and g = dy * w:
//   - pass 1 sums g, g * xc and xc over the row (per segment: dy, dy * xc);
//   - the mean is refined to the exact mean of the row, mean[r] + sum(xc) / cols
//     (layer), so a saved mean rounded to float32 costs no precision;
//   - pass 2 (from cache) writes dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//     (rms: without the mean(g) term), xhat = (x - exact mean) * rstd.
// Weight gradients:
//   - per column (segments == 0): rows are taken in blocks of block_rows;
//     block k adds dy * xhat and dy into partial_dweight / partial_dbias
//     [k * cols + c] (accumulation type, both or neither); the core merges the
//     blocks in order. Threads take whole blocks, so the result does not depend
//     on the thread count.
//   - per segment (segments > 0, required then): segment_sum_dy[r * segments + j]
//     = sum of dy over run j, segment_sum_dy_xc = sum of dy * (x - mean[r]),
//     row_sum_xc[r] = sum of (x - mean[r]), in double, relative to mean[r]
//     as given (the core refines with row_sum_xc).
// dx null: pass 1 only (the per-segment sums).
struct RowsBackward {
  RowsNorm norm = RowsNorm::layer;  // layer or rms
  DType dtype = DType::float32;     // of x, dy and dx
  std::int64_t rows = 0;
  std::int64_t cols = 0;  // > 0
  const void* x = nullptr;
  std::int64_t x_row_stride = 0;
  const void* dy = nullptr;
  std::int64_t dy_row_stride = 0;
  void* dx = nullptr;
  std::int64_t dx_row_stride = 0;
  std::int64_t segments = 0;      // 0: affine per column
  std::int64_t param_period = 1;  // run j of row r uses weight (r % param_period) * segments + j
  // Per segment only: row r is `planes` planes of `cols` elements, plane_pitch
  // apart (in x, dy and dx alike), each cut into the same runs; the sums and
  // statistics are the whole row's (BatchNorm channels first, a row per
  // channel: its planes over the samples).
  std::int64_t planes = 1;
  std::int64_t plane_pitch = 0;
  const void* weight = nullptr;   // stats_dtype(dtype), per column or segment entry; null: ones
  const void* mean = nullptr;     // per row, stats_dtype(dtype) (layer)
  const void* rstd = nullptr;     // per row, stats_dtype(dtype)
  std::int64_t block_rows = 1;
  void* partial_dweight = nullptr;  // stats_dtype(dtype), [blocks * cols]
  void* partial_dbias = nullptr;
  double* segment_sum_dy = nullptr;
  double* segment_sum_dy_xc = nullptr;
  double* row_sum_xc = nullptr;
  bool streaming_stores = false;
  int threads = 1;
};

// The "columns" pattern, backward sums: per (batch, block of block_rows rows,
// column), with center per (batch, column) (table_stride entries per batch,
// stats_dtype; null: 0): sums of dy, dy * (x - center) and (x - center), in
// double, into partial_*[(b * blocks + k) * cols + c]. The core merges blocks in order.
struct ColumnsGradSums {
  DType dtype = DType::float32;
  std::int64_t batches = 0, rows = 0, cols = 0, block_rows = 1;
  std::int64_t row_pitch = 0;  // as ColumnsStats: a band of `cols` columns out of longer rows
  const void* x = nullptr;
  const void* dy = nullptr;
  const void* center = nullptr;
  std::int64_t table_stride = 0;
  double* partial_dy = nullptr;
  double* partial_dy_xc = nullptr;
  double* partial_xc = nullptr;
  int threads = 1;
};

// One table per compiled instruction set. Kernels are looked up here, never
// called by name, so the core is compiled once, for the baseline ISA.
struct IsaKernels {
  const char* name;
  void (*rows_forward)(const RowsForward& problem);
  void (*columns_stats)(const ColumnsStats& problem);
  void (*columns_apply)(const ColumnsApply& problem);
  void (*rows_backward)(const RowsBackward& problem);
  void (*columns_grad_sums)(const ColumnsGradSums& problem);
};

namespace scalar { extern const IsaKernels kTable; }
#if defined(NORMKIT_HAVE_AVX2_KERNELS)
namespace avx2 { extern const IsaKernels kTable; }
#endif
#if defined(NORMKIT_HAVE_AVX512_KERNELS)
namespace avx512 { extern const IsaKernels kTable; }
#endif
#if defined(NORMKIT_HAVE_AVX512_BF16_KERNELS)
namespace avx512_bf16 { extern const IsaKernels kTable; }
#endif

}  // namespace normkit::kernels
