#include "plan/channel_plan.hpp"

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <type_traits>

#include "core/check.hpp"
#include "kernels/kernel_api.hpp"
#include "plan/merge.hpp"
#include "plan/rows_plan.hpp"
#include "plan/store_plan.hpp"
#include "runtime/dispatch.hpp"
#include "runtime/threads.hpp"

namespace normkit::plan {

namespace {

bool is_16bit(DType d) { return d == DType::float16 || d == DType::bfloat16; }

// Elements of the stats dtype (double for float64 x, else float), converted
// from double tables. A sized table's entries are unset until written (each
// user writes those its kernel reads): a table is allocated per call, and
// zeroing one of C * S entries was a pass of its own.
struct AccTable {
  bool wide = false;
  std::unique_ptr<float[]> f;
  std::unique_ptr<double[]> d;
  const void* data() const { return at(0); }
  const void* at(std::size_t i) const {
    return wide ? static_cast<const void*>(d.get() + i) : static_cast<const void*>(f.get() + i);
  }
  void set(std::size_t i, double v) {
    if (wide) d[i] = v;
    else f[i] = static_cast<float>(v);
  }
  void copy(std::size_t to, std::size_t from) {
    if (wide) d[to] = d[from];
    else f[to] = f[from];
  }
  // Entries [at, at + count): value(k) for entry at + k, one branch per range.
  template <class Value>
  void fill(std::size_t at, std::int64_t count, Value&& value) {
    if (wide) fill_as(d.get() + at, count, value);
    else fill_as(f.get() + at, count, value);
  }
  // Entries [at, at + count * repeat): each of v[0..count) `repeat` times.
  void fill_repeated(std::size_t at, const double* v, std::int64_t count, std::int64_t repeat) {
    if (wide) fill_repeated_as(d.get() + at, v, count, repeat);
    else fill_repeated_as(f.get() + at, v, count, repeat);
  }

 private:
  template <class A, class Value>
  static void fill_as(A* out, std::int64_t count, Value& value) {
    for (std::int64_t k = 0; k < count; ++k) out[k] = static_cast<A>(value(k));
  }
  template <class A>
  static void fill_repeated_as(A* out, const double* v, std::int64_t count, std::int64_t repeat) {
    for (std::int64_t i = 0; i < count; ++i, out += repeat) std::fill(out, out + repeat, static_cast<A>(v[i]));
  }
};
AccTable sized_acc_table(std::size_t n, DType x_dtype) {
  AccTable t;
  t.wide = x_dtype == DType::float64;
  if (t.wide) t.d.reset(new double[n]);
  else t.f.reset(new float[n]);
  return t;
}

// With a centre c: y = (x - c) * scale + shift = (x - hi) * scale + (shift - (c - hi) * scale),
// hi = c rounded to the stats dtype. x - hi is exact for x near the mean, and the
// rest of c goes into the shift here in double: one subtraction per value instead
// of two (a large mean stays exact either way).
struct FoldedCenter {
  double hi, shift;
};
double round_to_stats(double v, DType x_dtype) { return x_dtype == DType::float64 ? v : double(float(v)); }
FoldedCenter fold_center(double center, double scale, double shift, DType x_dtype) {
  const double hi = round_to_stats(center, x_dtype);
  return {hi, shift - (center - hi) * scale};
}

// Columns [c0, c1) of batch b from a columns statistics' block partials
// (`blocks` per batch): each column's blocks merged in block order, the columns
// side by side, into col_mean / col_m2 [0, c1 - c0); returns the rows per column.
double merge_column_blocks(const kernels::ColumnsStats& p, std::int64_t blocks, std::int64_t b, std::int64_t c0,
                           std::int64_t c1, double* col_mean, double* col_m2) {
  const std::int64_t first = b * blocks * p.cols + c0;
  const double* m2 = p.partial_m2 + first;
  return merge_sets_side_by_side(
      blocks, c1 - c0, p.cols,
      [&](std::int64_t k) { return double(k + 1 < blocks ? p.block_rows : p.rows - k * p.block_rows); },
      p.partial_mean + first, [m2](std::int64_t r) { return m2[r]; }, col_mean, col_m2);
}
AccTable to_acc_table(const std::vector<double>& v, DType x_dtype) {
  AccTable t = sized_acc_table(v.size(), x_dtype);
  for (std::size_t i = 0; i < v.size(); ++i) t.set(i, v[i]);
  return t;
}

// Sums the kernels took about the centre rounded to the stats dtype, moved to
// the exact centre (`shift` = exact - rounded) and added to an entry's;
// `count` values.
void add_recentred(double& dy, double& dy_xc, double& xc, double shift, double count, double sum_dy,
                   double sum_dy_xc, double sum_xc) {
  dy += sum_dy;
  dy_xc += sum_dy_xc - shift * sum_dy;
  xc += sum_xc - shift * count;
}

const char* element_at(const void* base, std::int64_t offset, DType dtype) {
  return static_cast<const char*>(base) + offset * element_size(dtype);
}

// The rows kernels over channels-first planes: `rows` rows of s elements,
// `row_stride` apart, from element `offset` of each tensor.
struct PlaneRows {
  std::int64_t offset, rows, row_stride;
};

// The rows backward's sums pass (no dx) over planes: per row, sums of dy,
// dy * (x - center[r]) and (x - center[r]) (center per row, rstd 1).
kernels::RowsBackward plane_sums_problem(const TensorRef& x, const TensorRef& dy, const ChannelGeometry& g,
                                         const PlaneRows& planes, const void* center, const void* ones,
                                         double* sum_dy, double* sum_dy_xc, double* sum_xc) {
  kernels::RowsBackward p;
  p.norm = kernels::RowsNorm::layer;
  p.dtype = x.dtype;
  p.rows = planes.rows;
  p.cols = g.s;
  p.x = element_at(x.data, planes.offset, x.dtype);
  p.x_row_stride = planes.row_stride;
  p.dy = element_at(dy.data, planes.offset, x.dtype);
  p.dy_row_stride = planes.row_stride;
  p.segments = 1;
  p.mean = center;
  p.rstd = ones;
  p.segment_sum_dy = sum_dy;
  p.segment_sum_dy_xc = sum_dy_xc;
  p.row_sum_xc = sum_xc;
  return p;
}

// The rows kernel's scale-shift pass over planes, x into y (tables, apply
// terms, store and threads left to the caller).
kernels::RowsForward plane_apply_problem(const TensorRef& x, const TensorRef& y, const ChannelGeometry& g,
                                         const PlaneRows& planes) {
  kernels::RowsForward p;
  p.norm = kernels::RowsNorm::scale_shift;
  p.dtype = x.dtype;
  p.params_float32 = x.dtype != DType::float64;
  p.rows = planes.rows;
  p.cols = g.s;
  p.x = element_at(x.data, planes.offset, x.dtype);
  p.x_row_stride = planes.row_stride;
  p.y = const_cast<char*>(element_at(y.data, planes.offset, y.dtype));
  p.y_row_stride = planes.row_stride;
  p.segments = 1;
  return p;
}

// Rows per block of the columns statistics (the blocks' partials are merged in
// double afterwards): at most ~256 KiB per block (16 to 4096 rows, `inputs`
// arrays sharing them), which stays in L2 between the two passes; then blocks
// of equal size, an even number of them, so that two threads get equal shares
// (64 rows in blocks of at most 51 were 51 + 13). The blocks follow from the
// shape alone: results do not depend on the thread count.
std::int64_t columns_block_rows(std::int64_t rows, std::int64_t cols, DType dtype, int inputs) {
  const std::int64_t most =
      std::clamp<std::int64_t>((256 * 1024) / (cols * element_size(dtype) + 1), 16, 4096) / inputs;
  std::int64_t blocks = (rows + most - 1) / most;
  if (blocks > 1) blocks += blocks % 2;
  return std::max<std::int64_t>(1, (rows + blocks - 1) / blocks);
}

// The columns apply of x into y, `batches` of rows x cols, with tables of
// cols + kColumnsTablePad entries per batch (see ColumnsApply); the caller adds
// the centre, the store and the threads. Units of ~64 KiB of x.
kernels::ColumnsApply columns_apply_problem(const TensorRef& x, const TensorRef& y, std::int64_t batches,
                                            std::int64_t rows, std::int64_t cols, const void* scale,
                                            const void* shift) {
  kernels::ColumnsApply p;
  p.dtype = x.dtype;
  p.batches = batches;
  p.rows = rows;
  p.cols = cols;
  p.block_rows = std::min<std::int64_t>(rows, 1 + (64 * 1024) / (cols * element_size(x.dtype)));
  p.table_stride = cols + kernels::kColumnsTablePad;
  p.x = x.data;
  p.y = y.data;
  p.scale = scale;
  p.shift = shift;
  return p;
}

// The columns statistics of `batches` x `rows` x `cols` contiguous elements of
// x in fixed row blocks (columns_block_rows), their partials in `partials`
// (sized here); the caller adds the threads or the unit range.
struct ColumnPartials {
  // Uninitialized: the kernel writes every (unit, column) entry the merge reads.
  std::unique_ptr<double[]> mean, m2;
  std::int64_t blocks = 0;  // row blocks per batch
};
kernels::ColumnsStats columns_stats_problem(const TensorRef& x, std::int64_t batches, std::int64_t rows,
                                            std::int64_t cols, ColumnPartials& partials) {
  kernels::ColumnsStats p;
  p.dtype = x.dtype;
  p.batches = batches;
  p.rows = rows;
  p.cols = cols;
  p.block_rows = columns_block_rows(rows, cols, x.dtype, 1);
  p.x = x.data;
  partials.blocks = (rows + p.block_rows - 1) / p.block_rows;
  const std::int64_t entries = batches * partials.blocks * cols;
  partials.mean.reset(new double[entries]);
  partials.m2.reset(new double[entries]);
  p.partial_mean = partials.mean.get();
  p.partial_m2 = partials.m2.get();
  return p;
}

}  // namespace

TensorRef sample_slice(const TensorRef& t, std::int64_t first, std::int64_t count) {
  TensorRef s = t;
  const std::int64_t sample_elements = t.shape[0] > 0 ? t.numel() / t.shape[0] : 0;
  s.data = static_cast<char*>(t.data) + first * sample_elements * element_size(t.dtype);
  s.shape[0] = count;
  return s;
}

std::int64_t samples_per_step(const ChannelGeometry& g, DType dtype) {
  // Up to ~8 MiB of x per step: it stays in the last-level cache (32 MiB or more
  // on the servers measured) for the second pass, and each step's fixed cost
  // (a thread team, its barriers, the tables) is spread over several samples.
  constexpr std::int64_t kStepBytes = std::int64_t(8) << 20;
  const std::int64_t sample_bytes = g.s * g.c * element_size(dtype);
  if (sample_bytes == 0) return std::max<std::int64_t>(g.n, 1);
  return std::max<std::int64_t>(1, std::min<std::int64_t>(g.n, kStepBytes / sample_bytes));
}

double read_element(const TensorRef& t, std::int64_t i) {
  switch (t.dtype) {
    case DType::float32: return static_cast<const float*>(t.data)[i];
    case DType::float64: return static_cast<const double*>(t.data)[i];
    case DType::float16: return static_cast<float>(static_cast<const half*>(t.data)[i]);
    case DType::bfloat16: return static_cast<float>(static_cast<const bfloat16*>(t.data)[i]);
    default: break;  // the quantized output types are never read
  }
  return 0;
}

std::vector<double> read_all(const TensorRef& t) {
  if (!t.given) return {};
  std::vector<double> v(t.numel());
  // One switch per table, not per element (C per call of a channels-last norm).
  const auto widen = [&v](const auto* p) {
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(p[i]);
  };
  switch (t.dtype) {
    case DType::float32: widen(static_cast<const float*>(t.data)); break;
    case DType::float64: std::copy_n(static_cast<const double*>(t.data), v.size(), v.begin()); break;
    case DType::float16: widen(static_cast<const half*>(t.data)); break;
    case DType::bfloat16: widen(static_cast<const bfloat16*>(t.data)); break;
    default: break;  // the quantized output types are never read
  }
  return v;
}

void write_element(const TensorRef& t, std::int64_t i, double v) {
  switch (t.dtype) {
    case DType::float32: static_cast<float*>(t.data)[i] = static_cast<float>(v); return;
    case DType::float64: static_cast<double*>(t.data)[i] = v; return;
    case DType::float16: static_cast<half*>(t.data)[i] = half(static_cast<float>(v)); return;
    case DType::bfloat16: static_cast<bfloat16*>(t.data)[i] = bfloat16(static_cast<float>(v)); return;
    default: return;  // statistics are never of a quantized type
  }
}

void write_all(const TensorRef& t, const std::vector<double>& v) {
  if (!t.given) return;
  // One switch per table, as read_all.
  const auto n = static_cast<std::size_t>(std::min<std::int64_t>(t.numel(), static_cast<std::int64_t>(v.size())));
  const auto narrow = [&v, n](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    for (std::size_t i = 0; i < n; ++i) p[i] = T(static_cast<float>(v[i]));
  };
  switch (t.dtype) {
    case DType::float32: narrow(static_cast<float*>(t.data)); return;
    case DType::float64: std::copy_n(v.begin(), n, static_cast<double*>(t.data)); return;
    case DType::float16: narrow(static_cast<half*>(t.data)); return;
    case DType::bfloat16: narrow(static_cast<bfloat16*>(t.data)); return;
    default: return;  // statistics are never of a quantized type
  }
}

ChannelGeometry channel_geometry(const TensorRef& x, std::optional<Layout> layout, const char* x_name) {
  core::check_given(x, x_name);
  core::check_float(x, x_name);
  const int rank = x.shape.size();
  ChannelGeometry g;
  g.layout = layout ? *layout : default_layout(rank);
  if (layout_rank(g.layout) != rank)
    core::fail_value(std::string("layout: ") + to_string(g.layout) + " describes " +
                     std::to_string(layout_rank(g.layout)) + "-D arrays, but " + x_name + " has shape " +
                     x.shape.to_string());
  if (!x.is_contiguous())
    core::fail_value(std::string(x_name) + ": must be contiguous in its layout (pass a contiguous copy)");
  g.channels_last = is_channels_last(g.layout);
  g.n = x.shape[0];
  g.c = x.shape[channel_axis(g.layout)];
  g.s = 1;
  for (int i = 1; i < rank; ++i)
    if (i != channel_axis(g.layout)) g.s *= x.shape[i];
  return g;
}

void check_num_groups(std::int64_t num_groups, std::int64_t channels) {
  if (num_groups <= 0 || channels % num_groups != 0 || num_groups > std::max<std::int64_t>(channels, 1))
    core::fail_value("num_groups: must be a positive divisor of the number of channels C=" + std::to_string(channels) +
                     ", got " + std::to_string(num_groups));
}

ChannelGeometry style_geometry(const TensorRef& x, const ChannelGeometry& g, const TensorRef& style) {
  core::check_given(style, "style");
  if (style.shape.size() != x.shape.size())
    core::fail_value("style: expected a feature map of rank " + std::to_string(x.shape.size()) +
                     " like x (layout " + to_string(g.layout) + "), got shape " + style.shape.to_string());
  const ChannelGeometry gs = channel_geometry(style, g.layout, "style");
  if (gs.n != g.n || gs.c != g.c)
    core::fail_value("style: expected N=" + std::to_string(g.n) + " and C=" + std::to_string(g.c) +
                     " like x, got shape " + style.shape.to_string());
  if (style.dtype != x.dtype)
    core::fail_type(std::string("style: expected dtype ") + to_string(x.dtype) + " like x, got " +
                    to_string(style.dtype));
  return gs;
}

void check_output_like(const TensorRef& x, const TensorRef& y, const char* y_name, std::optional<DType> y_dtype) {
  core::check_given(y, y_name);
  if (y.shape != x.shape)
    core::fail_value(std::string(y_name) + ": expected the shape of x " + x.shape.to_string() + ", got " +
                     y.shape.to_string());
  const DType expected = y_dtype ? *y_dtype : x.dtype;
  if (y.dtype != expected)
    core::fail_type(std::string(y_name) + ": expected dtype " + to_string(expected) +
                    (expected == x.dtype ? " like x" : " for the quantized output") + ", got " + to_string(y.dtype));
  if (!y.is_contiguous()) core::fail_value(std::string(y_name) + ": must be contiguous");
  if (expected == x.dtype) core::check_no_partial_overlap(x, y, y_name);
}

void check_channel_param(const TensorRef& t, const char* name, std::int64_t channels, DType x_dtype) {
  if (!t.given) return;
  const DType dtype = (is_16bit(x_dtype) && t.dtype == DType::float32) ? DType::float32 : x_dtype;
  core::check_param(t, name, Dims{channels}, dtype);
}

void check_running_stat(const TensorRef& t, const char* name, std::int64_t channels, DType x_dtype) {
  if (!t.given) return;
  const DType dtype = t.dtype == DType::float32 ? DType::float32 : x_dtype;
  core::check_param(t, name, Dims{channels}, dtype);
}

void write_stats_output(const TensorRef& t, const char* name, const std::vector<double>& values, DType x_dtype) {
  if (!t.given) return;
  core::check_stats_output(t, name, static_cast<std::int64_t>(values.size()), stats_dtype(x_dtype));
  write_all(t, values);
}

void fused_group_rows(const TensorRef& x, const TensorRef& y, const ChannelGeometry& g, std::int64_t groups,
                      const void* weight, const void* bias, DType param_dtype, std::int64_t param_period,
                      double eps, GroupMoments& moments, const kernels::StoreStage* store) {
  const std::int64_t rows = g.n * groups;
  const std::int64_t cols = (g.c / groups) * g.s;
  moments.count = cols;
  moments.mean.assign(rows, 0);
  moments.var.assign(rows, 0);
  if (rows == 0 || cols == 0) return;
  kernels::RowsForward p;
  p.norm = kernels::RowsNorm::layer;
  p.dtype = x.dtype;
  p.params_float32 = is_16bit(x.dtype) && param_dtype == DType::float32;
  p.rows = rows;
  p.cols = cols;
  p.x = x.data;
  p.x_row_stride = cols;
  p.y = y.data;
  p.y_row_stride = cols;
  p.segments = g.c / groups;
  p.param_period = param_period;
  p.weight = weight;
  p.bias = bias;
  p.mean_f64 = moments.mean.data();
  p.var_f64 = moments.var.data();
  p.eps = eps;
  p.store = store ? *store : plain_store(x.dtype);
  const std::int64_t bytes = x.numel() * element_size(x.dtype);
  p.streaming_stores = !core::same_memory(x, y) && runtime::use_streaming_stores(bytes);
  p.threads = runtime::threads_for_rows(2 * bytes, rows);
  dispatch_rows(p, param_period * p.segments);
}

namespace {
// BatchNorm's statistics and gradient sums over channels-first planes under
// kMaxColumnsStatsPlaneBytes go per (channel, position) over the samples, in
// bands of whole channels (see channel_plan.hpp): the channels of a band.
bool small_planes_in_bands(const ChannelGeometry& g, DType dtype, bool per_sample) {
  return !g.channels_last && !per_sample && g.s * element_size(dtype) < kMaxColumnsStatsPlaneBytes;
}
std::int64_t small_plane_band_channels(const ChannelGeometry& g, DType dtype) {
  return std::max<std::int64_t>(1, kColumnsStatsBandBytes / element_size(stats_dtype(dtype)) / g.s);
}
}  // namespace

GroupMoments channel_moments(const TensorRef& x, const ChannelGeometry& g, std::int64_t groups, bool per_sample) {
  GroupMoments out;
  const std::int64_t tables = per_sample ? g.n * groups : g.c;
  out.mean.assign(tables, 0);
  out.var.assign(tables, 0);
  out.count = per_sample ? (g.c / groups) * g.s : g.n * g.s;
  if (x.numel() == 0) return out;
  const auto& kernels = runtime::active_kernels();
  const std::int64_t bytes = x.numel() * element_size(x.dtype);

  if (small_planes_in_bands(g, x.dtype, per_sample)) {
    // Planes of a few lines: the columns statistics per (channel, position) over
    // the samples, then merged per channel. The C * S columns go in bands of
    // whole channels, at most kColumnsStatsBandBytes of accumulators, each one
    // block of all N samples: the kernel sweeps a band's rows in memory order,
    // its sums in L1, and the same thread merges the band's channels from its
    // partials while they are in L1 (partials of all C * S columns, merged after
    // a barrier, were page-faulted in on every call: [1,512,7,7] 170 us). Bands
    // are shared out over the team and fixed by the shape, so the values do not
    // depend on the thread count.
    const std::int64_t band_channels = small_plane_band_channels(g, x.dtype), band_cols = band_channels * g.s;
    const std::int64_t bands = (g.c + band_channels - 1) / band_channels;
    const int threads = runtime::threads_for(bytes);
    std::vector<double> partials(threads * 2 * band_cols);  // each thread's band, allocated out of the team
    runtime::run_team(threads, [&](int id, int team) {
      kernels::ColumnsStats q;  // a band: one block of N rows of its channels' columns
      q.dtype = x.dtype;
      q.batches = 1;
      q.rows = q.block_rows = g.n;
      q.row_pitch = g.c * g.s;
      q.partial_mean = partials.data() + id * 2 * band_cols;
      q.partial_m2 = q.partial_mean + band_cols;
      const runtime::Share mine = runtime::share_of(bands, id, team);
      for (std::int64_t k = mine.begin; k < mine.end; ++k) {
        const std::int64_t c0 = k * band_channels, c1 = std::min(g.c, c0 + band_channels);
        q.cols = (c1 - c0) * g.s;
        q.x = element_at(x.data, c0 * g.s, x.dtype);
        kernels.columns_stats(q);
        for (std::int64_t c = c0; c < c1; ++c) {
          const std::int64_t first = (c - c0) * g.s;
          const Summary m = merge_equal_counts(g.s, double(g.n), q.partial_mean + first, q.partial_m2 + first);
          out.mean[c] = m.mean;
          out.var[c] = m.m2 / m.count;
        }
      }
    });
    return out;
  }
  if (!g.channels_last) {
    // Rows statistics: per (sample, group) directly, or per (sample, channel)
    // plane, then merged over the samples for BatchNorm.
    const std::int64_t row_groups = per_sample ? groups : g.c;
    const std::int64_t nrows = g.n * row_groups;
    const std::int64_t cols = (g.c / row_groups) * g.s;
    std::vector<double> row_mean(nrows), row_var(nrows);
    kernels::RowsForward p;
    p.norm = kernels::RowsNorm::layer;
    p.dtype = x.dtype;
    p.rows = nrows;
    p.cols = cols;
    p.x = x.data;
    p.x_row_stride = cols;
    p.y = nullptr;  // statistics only
    p.mean_f64 = row_mean.data();
    p.var_f64 = row_var.data();
    p.threads = runtime::threads_for(bytes);
    kernels.rows_forward(p);
    if (per_sample) {
      out.mean = row_mean;
      out.var = row_var;
    } else {
      // Each channel's planes merged over the samples, the channels side by side.
      merge_side_by_side(g.n, g.c, double(cols), row_mean.data(), row_var.data(), out.mean.data(), out.var.data());
    }
    return out;
  }

  // Columns statistics per (batch, channel) from fixed row blocks.
  ColumnPartials partials;
  kernels::ColumnsStats p =
      columns_stats_problem(x, per_sample ? g.n : 1, per_sample ? g.s : g.n * g.s, g.c, partials);
  const std::int64_t blocks = partials.blocks;
  p.threads = runtime::threads_for(bytes);
  kernels.columns_stats(p);

  // Every column's blocks merged side by side, then each group's columns.
  const std::int64_t per_group = per_sample ? g.c / groups : 1;
  const std::int64_t out_groups = per_sample ? groups : g.c;
  std::vector<double> col_mean(g.c), col_m2(g.c);
  for (std::int64_t b = 0; b < p.batches; ++b) {
    const double rows = merge_column_blocks(p, blocks, b, 0, g.c, col_mean.data(), col_m2.data());
    for (std::int64_t grp = 0; grp < out_groups; ++grp) {
      const std::int64_t c0 = grp * per_group;
      const Summary m = merge_equal_counts(per_group, rows, col_mean.data() + c0, col_m2.data() + c0);
      out.mean[b * out_groups + grp] = m.mean;
      out.var[b * out_groups + grp] = m.m2 / m.count;
    }
  }
  return out;
}

bool small_planes_as_columns(const ChannelGeometry& g, DType dtype) {
  const std::int64_t plane_bytes = g.s * element_size(dtype);
  return plane_bytes < kMaxColumnsStatsPlaneBytes ||
         (plane_bytes < kMinChannelPlaneBytes && g.c * g.s * element_size(stats_dtype(dtype)) <= kMaxColumnsTableBytes);
}

namespace {

// Channels per chunk of the small-plane columns apply: as many whole planes as
// fill a table of kColumnsTableChunkBytes (at least one, at most C).
std::int64_t plane_chunk_channels(const ChannelGeometry& g, DType dtype) {
  return std::clamp<std::int64_t>(kColumnsTableChunkBytes / (g.s * element_size(stats_dtype(dtype))), 1, g.c);
}

// The double tables of an apply step, per channel (see channel_apply); center
// and dy_scale may be null.
struct ChannelTables {
  const std::vector<double>* scale = nullptr;
  const std::vector<double>* shift = nullptr;
  const std::vector<double>* center = nullptr;
  const std::vector<double>* dy_scale = nullptr;
};

// The columns apply over small channels-first planes (see small_planes_as_columns),
// a chunk of channels at a time: for chunk [c0, c1) each sample's run of
// (c1 - c0) * S elements is one row of columns (channel c's entry repeated over its
// plane), with tables of that chunk alone, so they stay in L2 whatever C is. A
// team takes the chunks in order, its threads a share of the samples each (last
// first after a statistics pass, as the columns kernel does). Each thread lays
// out the chunk's tables itself, in its own L2-sized buffers: tables of C * S
// entries laid out before the team (400 KiB each for [N,2048,7,7], page faults
// included) cost while the other thread waited (Zen 5 EPYC, 2 threads, float32:
// inference [32,2048,7,7] 0.77 -> 0.52 ms, [8,2048,7,7] 0.39 -> 0.14, backward
// 3.4 -> 2.5 and 1.36 -> 0.55; 25 MiB shapes unchanged).
// `base`: the problem of the first chunk (its cols and table_stride give the
// chunks'), with the store, apply terms (non-null where a table is given) and
// stream flag.
void apply_small_planes_in_chunks(const TensorRef& x, const TensorRef& y, const TensorRef& dy, const ChannelGeometry& g,
                                  const kernels::ColumnsApply& base, const ChannelTables& tables, int threads) {
  const auto& kernels = runtime::active_kernels();
  const std::int64_t per_chunk = base.cols / g.s, stride = base.table_stride;
  const std::int64_t chunks = (g.c + per_chunk - 1) / per_chunk;
  // Each thread's four tables (scale, shift, center, dy_scale), allocated here:
  // freed by the team's threads, they went back to the system each call, to be
  // page-faulted in again ([8,512,7,7] backward 0.3 ms in a C++ loop).
  AccTable all = sized_acc_table(threads * 4 * stride, x.dtype);
  runtime::run_team(threads, [&](int id, int team) {
    const runtime::Share samples = runtime::share_of(g.n, id, team);
    if (samples.end <= samples.begin) return;
    const std::size_t mine = id * 4 * stride;
    for (std::int64_t k = 0; k < chunks; ++k) {
      const std::int64_t c0 = k * per_chunk, c1 = std::min(g.c, c0 + per_chunk), cols = (c1 - c0) * g.s;
      // Table q of this thread's four (nullptr where v is not given): channel
      // c's entry repeated over its plane, then the first entries repeated as
      // far as the kernel reads (a last, smaller chunk's table ends before the stride).
      auto lay_out = [&](int q, const std::vector<double>* v) -> const void* {
        if (!v) return nullptr;
        const std::size_t t0 = mine + q * stride;
        all.fill_repeated(t0, v->data() + c0, c1 - c0, g.s);
        for (std::int64_t j = cols; j < cols + kernels::kColumnsTablePad; ++j) all.copy(t0 + j, t0 + j % cols);
        return all.at(t0);
      };
      kernels::ColumnsApply p = base;
      p.batches = 1;
      p.rows = 1;
      p.block_rows = 1;
      p.cols = cols;
      p.table_stride = stride;
      p.scale = lay_out(0, tables.scale);
      p.shift = lay_out(1, tables.shift);
      if (tables.center) p.apply.center = lay_out(2, tables.center);
      if (tables.dy_scale) p.apply.dy_scale = lay_out(3, tables.dy_scale);
      p.threads = 1;
      for (std::int64_t i = samples.begin; i < samples.end; ++i) {
        const std::int64_t n = base.last_first ? samples.end - 1 - (i - samples.begin) : i;
        const std::int64_t offset = (n * g.c + c0) * g.s;
        p.x = element_at(x.data, offset, x.dtype);
        p.y = const_cast<char*>(element_at(y.data, offset, y.dtype));
        if (dy.given) p.apply.dy = element_at(dy.data, offset, x.dtype);
        kernels.columns_apply(p);
      }
    }
  });
}

}  // namespace

void channel_apply(const TensorRef& x, const TensorRef& y, const ChannelGeometry& g, bool per_sample,
                   const std::vector<double>& scale, const std::vector<double>& shift,
                   const std::vector<double>* center, std::int64_t whole_output_bytes, const TensorRef& dy,
                   const std::vector<double>* dy_scale, const kernels::StoreStage* store) {
  if (x.numel() == 0) return;
  const auto& kernels = runtime::active_kernels();
  const std::int64_t bytes = x.numel() * element_size(x.dtype);
  const std::int64_t batches = per_sample ? g.n : 1;
  // Channels last, and channels first with small planes (as rows of columns,
  // each channel's entry repeated over its plane, a chunk of channels at a
  // time), go to the columns kernel, which reads tables extended periodically
  // per batch or chunk (see ColumnsApply); the rows kernel reads them as they are.
  const bool planes_as_columns = !g.channels_last && !per_sample && small_planes_as_columns(g, x.dtype);
  std::vector<double> hi, folded_shift;
  if (center) {  // see fold_center
    hi.resize(center->size());
    folded_shift.resize(center->size());
    for (std::size_t i = 0; i < hi.size(); ++i) {
      const FoldedCenter f = fold_center((*center)[i], scale[i], shift[i], x.dtype);
      hi[i] = f.hi;
      folded_shift[i] = f.shift;
    }
  }
  const ChannelTables tables{&scale, center ? &folded_shift : &shift, center ? &hi : nullptr,
                             dy.given ? dy_scale : nullptr};
  const bool stream = !core::same_memory(x, y) && !(dy.given && core::same_memory(dy, y)) &&
                      runtime::use_streaming_stores(std::max(bytes, whole_output_bytes));
  const int threads = runtime::threads_for(2 * bytes);
  auto finish = [&](auto& p) {  // what the rows and the columns problems share
    p.apply.dy = dy.given ? dy.data : nullptr;
    p.store = store ? *store : plain_store(x.dtype);
    p.streaming_stores = stream;
    p.threads = threads;
  };
  if (planes_as_columns) {  // the chunks lay their tables out themselves
    const std::int64_t cols = plane_chunk_channels(g, x.dtype) * g.s;
    kernels::ColumnsApply p = columns_apply_problem(x, y, 1, g.n, cols, nullptr, nullptr);
    finish(p);
    p.last_first = center != nullptr;  // a centre: statistics just computed from x
    apply_small_planes_in_chunks(x, y, dy, g, p, tables, threads);
    return;
  }
  // The tables in the stats dtype: as they are for the rows kernel; channels
  // last, `batches` parts of C entries, each padded by repeating its first entries.
  auto table = [&](const std::vector<double>* v) {
    if (!v) return AccTable{};
    if (!g.channels_last) return to_acc_table(*v, x.dtype);
    const std::int64_t stride = g.c + kernels::kColumnsTablePad;
    AccTable t = sized_acc_table(batches * stride, x.dtype);
    for (std::int64_t k = 0; k < batches; ++k) {
      t.fill_repeated(k * stride, v->data() + k * g.c, g.c, 1);
      for (std::int64_t j = g.c; j < stride; ++j) t.copy(k * stride + j, k * stride + j % g.c);
    }
    return t;
  };
  const AccTable scale_t = table(tables.scale), shift_t = table(tables.shift), center_t = table(tables.center),
                 dy_scale_t = table(tables.dy_scale);
  kernels::ApplyTerms apply;  // what the rows and the columns kernels share
  apply.center = tables.center ? center_t.data() : nullptr;
  apply.dy_scale = tables.dy_scale ? dy_scale_t.data() : nullptr;
  if (!g.channels_last) {
    kernels::RowsForward p = plane_apply_problem(x, y, g, PlaneRows{0, g.n * g.c, g.s});
    p.param_period = per_sample ? g.n * g.c : g.c;
    p.weight = scale_t.data();
    p.bias = shift_t.data();
    p.apply = apply;
    p.apply.dy_row_stride = g.s;
    finish(p);
    // A centre: statistics just computed from x. Last first only for outputs
    // large enough to stream: where x fits in the last-level cache it is all
    // still there, and the forward order, which the hardware prefetchers
    // follow across rows, was 10-15% faster (BatchNorm training NCHW 16-bit,
    // 12 MiB; Zen 5 EPYC, both paths; the 24 MiB float32 case gains 2-4% last first).
    p.last_first = center != nullptr && stream;
    kernels.rows_forward(p);
    return;
  }
  const std::int64_t rows = per_sample ? g.s : g.n * g.s;
  kernels::ColumnsApply p = columns_apply_problem(x, y, batches, rows, g.c, scale_t.data(), shift_t.data());
  p.apply = apply;
  finish(p);
  p.last_first = center != nullptr;  // a centre: statistics just computed from x
  kernels.columns_apply(p);
}

ChannelsLastItems channels_last_items(const ChannelGeometry& g, std::int64_t groups, DType dtype) {
  ChannelsLastItems it;
  it.band_groups = groups;
  const std::int64_t sample_bytes = g.s * g.c * element_size(dtype);
  if (sample_bytes > kMaxChannelsLastItemSampleBytes) {
    it.by_rows = true;
    return it;
  }
  if (g.n >= kChannelsLastMinItems || sample_bytes == 0) {
    const std::int64_t fit = sample_bytes > 0 ? kChannelsLastItemBytes / sample_bytes : g.n;
    it.samples = std::clamp<std::int64_t>(fit, 1, std::max<std::int64_t>(1, g.n / kChannelsLastMinItems));
    return it;
  }
  // Few samples: bands of whole groups, a whole number of cache lines wide
  // where the groups allow (a line split between two bands is written by both).
  const std::int64_t group_bytes = (g.c / groups) * element_size(dtype);
  std::int64_t unit = 1;
  while (unit < groups && (unit * group_bytes) % 64 != 0) ++unit;
  const std::int64_t wanted = (kChannelsLastMinItems + g.n - 1) / g.n;
  const std::int64_t per_band = (groups + wanted - 1) / wanted;
  it.band_groups = std::min(groups, std::max(unit, (per_band + unit - 1) / unit * unit));
  it.bands = (groups + it.band_groups - 1) / it.band_groups;
  return it;
}

namespace {

// The tables of a channels-last apply, y = (x - center) * scale + shift,
// `entries` entries each (uninitialized: each user writes those its kernel reads).
struct ApplyTables {
  AccTable scale, shift, center;
  ApplyTables(std::int64_t entries, DType x_dtype)
      : scale(sized_acc_table(entries, x_dtype)),
        shift(sized_acc_table(entries, x_dtype)),
        center(sized_acc_table(entries, x_dtype)) {}
  void copy(std::size_t to, std::size_t from) {
    for (AccTable* t : {&scale, &shift, &center}) t->copy(to, from);
  }
};

// Groups [g0, g1) of sample n, their columns' blocks merged into col_mean /
// col_m2 (`rows` values each; group g0's first column at index 0, and at
// index 0 of the affine a / b): the groups' moments into `all` (`groups` per
// sample), their columns' entries y = (x - hi) * scale + shift (see
// fold_center) into the tables from entry `at` on.
void write_group_tables(std::int64_t n, std::int64_t g0, std::int64_t g1, std::int64_t groups, std::int64_t per_group,
                        double rows, const double* col_mean, const double* col_m2, const double* a, const double* b,
                        double eps, DType x_dtype, GroupMoments& all, ApplyTables& t, std::size_t at) {
  for (std::int64_t grp = g0; grp < g1; ++grp) {
    const std::int64_t k0 = (grp - g0) * per_group;
    const Summary m = merge_equal_counts(per_group, rows, col_mean + k0, col_m2 + k0);
    const double mean = m.mean, var = m.m2 / m.count, rstd = 1.0 / std::sqrt(var + eps);
    all.mean[n * groups + grp] = mean;
    all.var[n * groups + grp] = var;
    const double hi = round_to_stats(mean, x_dtype), rest = mean - hi;
    t.scale.fill(at + k0, per_group, [&](std::int64_t k) { return a[k0 + k] * rstd; });
    t.shift.fill(at + k0, per_group, [&](std::int64_t k) { return b[k0 + k] - rest * (a[k0 + k] * rstd); });
    t.center.fill(at + k0, per_group, [hi](std::int64_t) { return hi; });
  }
}

// channels_last_groups's affine per (sample, channel): sample n's entries of
// a table, an empty table standing for ones (a) or zeros (b).
class AffineEntries {
 public:
  AffineEntries(const ChannelAffine& affine, std::int64_t c)
      : affine_(affine), c_(c), ones_(affine.a.empty() ? c : 0, 1.0), zeros_(affine.b.empty() ? c : 0, 0.0) {}
  const double* a(std::int64_t n) const { return entries(affine_.a, ones_, n); }
  const double* b(std::int64_t n) const { return entries(affine_.b, zeros_, n); }

 private:
  const double* entries(const std::vector<double>& t, const std::vector<double>& unit, std::int64_t n) const {
    if (t.empty()) return unit.data();
    return t.data() + (static_cast<std::int64_t>(t.size()) == c_ ? 0 : n * c_);
  }
  const ChannelAffine& affine_;
  std::int64_t c_;
  std::vector<double> ones_, zeros_;
};

// Few samples too large for bands (see channels_last_items): a cache-sized
// step of samples at a time (samples_per_step), one thread team per step
// through the statistics (row blocks shared out), the merge and tables (shared
// out by group) and the output re-reading the step from cache, with barriers
// between.
void channels_last_groups_by_rows(const TensorRef& x, const TensorRef& y, const ChannelGeometry& g,
                                  std::int64_t groups, double eps, const kernels::StoreStage& store,
                                  const AffineEntries& affine, GroupMoments& all) {
  const auto& kernels = runtime::active_kernels();
  const std::int64_t step = samples_per_step(g, x.dtype);
  const std::int64_t per_group = g.c / groups;
  const std::int64_t stride = g.c + kernels::kColumnsTablePad;  // see ColumnsApply
  const std::int64_t whole_output_bytes = y.numel() * element_size(y.dtype);
  for (std::int64_t n0 = 0; n0 < g.n; n0 += step) {
    const std::int64_t count = std::min(step, g.n - n0);
    const TensorRef xs = sample_slice(x, n0, count), ys = sample_slice(y, n0, count);
    const std::int64_t bytes = xs.numel() * element_size(x.dtype);

    ColumnPartials partials;  // per (sample, column) and block
    const kernels::ColumnsStats stats = columns_stats_problem(xs, count, g.s, g.c, partials);
    const std::int64_t blocks = partials.blocks;
    ApplyTables tables(count * stride, x.dtype);  // per (sample, channel), filled by the merge step
    kernels::ColumnsApply apply =
        columns_apply_problem(xs, ys, count, g.s, g.c, tables.scale.data(), tables.shift.data());
    apply.apply.center = tables.center.data();
    apply.store = store;
    apply.streaming_stores =
        !core::same_memory(xs, ys) && runtime::use_streaming_stores(std::max(bytes, whole_output_bytes));
    apply.last_first = true;  // statistics just computed from the same x
    const std::int64_t apply_units = count * ((g.s + apply.block_rows - 1) / apply.block_rows);

    // Barriers cost less than a second fork (a [1,1280,8,8] GroupNorm spent
    // half its time between the two forks).
    const int threads = runtime::threads_for(2 * bytes);
    std::unique_ptr<double[]> columns(new double[threads * 2 * g.c]);  // each thread's merged columns
    runtime::run_team(threads, [&](int id, int team) {
      kernels::ColumnsStats mine = stats;
      const runtime::Share units = runtime::share_of(count * blocks, id, team);
      mine.unit_begin = units.begin;
      mine.unit_end = units.end;
      if (units.end > units.begin) kernels.columns_stats(mine);
      runtime::team_barrier();

      // This thread's (sample, group) sets, a sample's run of groups at a time.
      const runtime::Share sets = runtime::share_of(count * groups, id, team);
      double* col_mean = columns.get() + id * 2 * g.c;
      double* col_m2 = col_mean + g.c;
      for (std::int64_t set = sets.begin; set < sets.end;) {
        const std::int64_t i = set / groups, g0 = set % groups, g1 = std::min(groups, g0 + (sets.end - set));
        const std::int64_t c0 = g0 * per_group, c1 = g1 * per_group;
        const double rows = merge_column_blocks(stats, blocks, i, c0, c1, col_mean, col_m2);
        write_group_tables(n0 + i, g0, g1, groups, per_group, rows, col_mean, col_m2, affine.a(n0 + i) + c0,
                           affine.b(n0 + i) + c0, eps, x.dtype, all, tables, i * stride + c0);
        for (std::int64_t c = c0; c < c1 && c < stride - g.c; ++c)  // the pad entries that repeat these columns
          for (std::int64_t j = c + g.c; j < stride; j += g.c) tables.copy(i * stride + j, i * stride + c);
        set += g1 - g0;
      }
      runtime::team_barrier();

      kernels::ColumnsApply out = apply;
      const runtime::Share out_units = runtime::share_of(apply_units, id, team);
      out.unit_begin = out_units.begin;
      out.unit_end = out_units.end;
      if (out_units.end > out_units.begin) kernels.columns_apply(out);
    });
  }
}

}  // namespace

GroupMoments channels_last_groups(const TensorRef& x, const TensorRef& y, const ChannelGeometry& g, std::int64_t groups,
                                  double eps, const kernels::StoreStage& store, const ChannelAffine& affine) {
  GroupMoments all;
  all.mean.resize(g.n * groups);
  all.var.resize(g.n * groups);
  all.count = (g.c / groups) * g.s;
  if (x.numel() == 0) return all;
  const AffineEntries entries(affine, g.c);
  const ChannelsLastItems plan = channels_last_items(g, groups, x.dtype);
  if (plan.by_rows) {
    channels_last_groups_by_rows(x, y, g, groups, eps, store, entries, all);
    return all;
  }
  const auto& kernels = runtime::active_kernels();
  const std::int64_t per_group = g.c / groups;
  const std::int64_t band_cols = plan.band_groups * per_group;  // the widest band
  const std::int64_t stride = band_cols + kernels::kColumnsTablePad;  // see ColumnsApply
  const std::int64_t runs = (g.n + plan.samples - 1) / plan.samples, items = runs * plan.bands;
  const std::int64_t block_rows = columns_block_rows(g.s, band_cols, x.dtype, 1);
  const std::int64_t blocks = (g.s + block_rows - 1) / block_rows;
  const std::int64_t bytes = x.numel() * element_size(x.dtype);
  const bool streaming =
      plan.bands == 1 && !core::same_memory(x, y) &&
      runtime::use_streaming_stores(std::max(bytes, y.numel() * std::int64_t(element_size(y.dtype))));

  // Each thread's partials, merged columns and tables, allocated here (freed
  // in a team thread, glibc gave them back to the system: see part 7 of
  // bench/RESULTS.md) and uninitialized (every entry read is written first).
  struct Scratch {
    std::unique_ptr<double[]> partials, columns;
    ApplyTables tables;
  };
  const int threads = static_cast<int>(std::min<std::int64_t>(runtime::threads_for(2 * bytes), items));
  std::vector<Scratch> scratch;
  scratch.reserve(threads);
  for (int t = 0; t < threads; ++t)
    scratch.push_back({std::unique_ptr<double[]>(new double[2 * plan.samples * blocks * band_cols]),
                       std::unique_ptr<double[]>(new double[2 * band_cols]),
                       ApplyTables(plan.samples * stride, x.dtype)});
  const std::size_t esize = element_size(x.dtype), out_size = element_size(y.dtype);

  // Items of (a run of samples, a band of groups), each start to finish on one
  // thread: its columns' statistics, the merge and tables, then its output
  // while the item is in cache. No barriers, and an item's values depend on
  // the shape alone (not on the thread count).
  runtime::run_team(threads, [&](int id, int team) {
    Scratch& mine = scratch[id];
    const runtime::Share share = runtime::share_of(items, id, team);
    for (std::int64_t item = share.begin; item < share.end; ++item) {
      const std::int64_t n0 = (item / plan.bands) * plan.samples, count = std::min(plan.samples, g.n - n0);
      const std::int64_t g0 = (item % plan.bands) * plan.band_groups;
      const std::int64_t g1 = std::min(groups, g0 + plan.band_groups);
      const std::int64_t c0 = g0 * per_group, cols = (g1 - g0) * per_group;
      const std::int64_t first = n0 * g.s * g.c + c0;  // element of x and y

      kernels::ColumnsStats stats;
      stats.dtype = x.dtype;
      stats.batches = count;
      stats.rows = g.s;
      stats.cols = cols;
      stats.block_rows = block_rows;
      stats.row_pitch = g.c;
      stats.x = static_cast<const char*>(x.data) + first * esize;
      stats.partial_mean = mine.partials.get();
      stats.partial_m2 = mine.partials.get() + plan.samples * blocks * band_cols;
      kernels.columns_stats(stats);

      double* col_mean = mine.columns.get();
      double* col_m2 = col_mean + band_cols;
      for (std::int64_t i = 0; i < count; ++i) {
        const double rows = merge_column_blocks(stats, blocks, i, 0, cols, col_mean, col_m2);
        write_group_tables(n0 + i, g0, g1, groups, per_group, rows, col_mean, col_m2, entries.a(n0 + i) + c0,
                           entries.b(n0 + i) + c0, eps, x.dtype, all, mine.tables, i * stride);
        for (std::int64_t j = cols; j < cols + kernels::kColumnsTablePad; ++j)  // the pad repeats the columns
          mine.tables.copy(i * stride + j, i * stride + j % cols);
      }

      kernels::ColumnsApply apply =
          columns_apply_problem(x, y, count, g.s, cols, mine.tables.scale.data(), mine.tables.shift.data());
      apply.table_stride = stride;
      apply.row_pitch = g.c;
      apply.x = static_cast<const char*>(x.data) + first * esize;
      apply.y = static_cast<char*>(y.data) + first * out_size;
      apply.apply.center = mine.tables.center.data();
      apply.store = store;
      apply.streaming_stores = streaming;
      apply.last_first = true;  // statistics just computed from the same x
      kernels.columns_apply(apply);
    }
  });
  return all;
}

GradSums channel_grad_sums(const TensorRef& x, const TensorRef& dy, const ChannelGeometry& g, bool per_sample,
                           const std::vector<double>& center) {
  GradSums out;
  const std::int64_t entries = per_sample ? g.n * g.c : g.c;
  out.dy.assign(entries, 0);
  out.dy_xc.assign(entries, 0);
  out.xc.assign(entries, 0);
  out.count = per_sample ? g.s : g.n * g.s;
  if (x.numel() == 0) return out;
  const auto& kernels = runtime::active_kernels();
  const int threads = runtime::threads_for(2 * x.numel() * element_size(x.dtype));
  // The kernels sum relative to the center rounded to the stats dtype; the
  // sums are moved to the exact center at the end.
  if (small_planes_in_bands(g, x.dtype, per_sample)) {
    // As channel_moments: the columns sums per (channel, position) over the
    // samples in bands of whole channels, each band's channels summed by its
    // thread; a row per plane of a few lines took a horizontal sum of three
    // accumulators per plane ([8,512,7,7]: 4096 planes of 49 values).
    const std::int64_t per_band = small_plane_band_channels(g, x.dtype), band_cols = per_band * g.s;
    const std::int64_t bands = (g.c + per_band - 1) / per_band;
    AccTable centers = sized_acc_table(threads * band_cols, x.dtype);  // each thread's band of centres
    std::vector<double> partials(threads * 3 * band_cols);
    runtime::run_team(threads, [&](int id, int team) {
      double* part_dy = partials.data() + id * 3 * band_cols;
      double* part_dy_xc = part_dy + band_cols;
      double* part_xc = part_dy_xc + band_cols;
      kernels::ColumnsGradSums q;
      q.dtype = x.dtype;
      q.batches = 1;
      q.rows = q.block_rows = g.n;
      q.row_pitch = g.c * g.s;
      q.center = centers.at(id * band_cols);
      q.table_stride = band_cols;
      q.partial_dy = part_dy;
      q.partial_dy_xc = part_dy_xc;
      q.partial_xc = part_xc;
      const runtime::Share mine = runtime::share_of(bands, id, team);
      for (std::int64_t k = mine.begin; k < mine.end; ++k) {
        const std::int64_t c0 = k * per_band, c1 = std::min(g.c, c0 + per_band);
        q.cols = (c1 - c0) * g.s;
        q.x = element_at(x.data, c0 * g.s, x.dtype);
        q.dy = element_at(dy.data, c0 * g.s, x.dtype);
        centers.fill_repeated(id * band_cols, center.data() + c0, c1 - c0, g.s);  // rounded by the table
        kernels.columns_grad_sums(q);
        for (std::int64_t c = c0; c < c1; ++c) {
          const std::int64_t first = (c - c0) * g.s;
          add_recentred(out.dy[c], out.dy_xc[c], out.xc[c], center[c] - round_to_stats(center[c], x.dtype),
                        double(out.count), sum_in_lanes(part_dy + first, g.s), sum_in_lanes(part_dy_xc + first, g.s),
                        sum_in_lanes(part_xc + first, g.s));
        }
      }
    });
    return out;
  }
  if (!g.channels_last) {
    // Rows of one (sample, channel) plane each, sums only.
    const std::int64_t rows = g.n * g.c;
    std::vector<double> shift(entries);  // exact - rounded centre
    for (std::int64_t e = 0; e < entries; ++e) shift[e] = center[e] - round_to_stats(center[e], x.dtype);
    AccTable center_t = sized_acc_table(rows, x.dtype);
    for (std::int64_t n = 0, r = 0; n < g.n; ++n)
      for (std::int64_t c = 0; c < g.c; ++c, ++r) center_t.set(r, center[per_sample ? r : c]);
    AccTable ones = to_acc_table(std::vector<double>(rows, 1.0), x.dtype);
    std::vector<double> sum_dy(rows), sum_dy_xc(rows), sum_xc(rows);
    kernels::RowsBackward p = plane_sums_problem(x, dy, g, PlaneRows{0, rows, g.s}, center_t.data(), ones.data(),
                                                 sum_dy.data(), sum_dy_xc.data(), sum_xc.data());
    p.threads = threads;
    kernels.rows_backward(p);
    for (std::int64_t n = 0, r = 0; n < g.n; ++n)  // merged over samples in order
      for (std::int64_t c = 0; c < g.c; ++c, ++r) {
        const std::int64_t e = per_sample ? r : c;
        add_recentred(out.dy[e], out.dy_xc[e], out.xc[e], shift[e], double(g.s), sum_dy[r], sum_dy_xc[r], sum_xc[r]);
      }
    return out;
  }

  kernels::ColumnsGradSums p;
  p.dtype = x.dtype;
  p.batches = per_sample ? g.n : 1;
  p.rows = per_sample ? g.s : g.n * g.s;
  p.cols = g.c;
  p.block_rows = columns_block_rows(p.rows, g.c, x.dtype, 2);  // x and dy
  p.x = x.data;
  p.dy = dy.data;
  const AccTable center_t = to_acc_table(center, x.dtype);
  p.center = center_t.data();
  p.table_stride = g.c;
  const std::int64_t blocks = (p.rows + p.block_rows - 1) / p.block_rows;
  std::vector<double> part_dy(p.batches * blocks * g.c), part_dy_xc(part_dy.size()), part_xc(part_dy.size());
  p.partial_dy = part_dy.data();
  p.partial_dy_xc = part_dy_xc.data();
  p.partial_xc = part_xc.data();
  p.threads = threads;
  kernels.columns_grad_sums(p);
  for (std::int64_t b = 0; b < p.batches; ++b)
    for (std::int64_t k = 0; k < blocks; ++k) {
      const double rows_k = double(std::min(p.block_rows, p.rows - k * p.block_rows));
      for (std::int64_t c = 0; c < g.c; ++c) {
        const std::int64_t e = b * g.c + c, q = (b * blocks + k) * g.c + c;
        add_recentred(out.dy[e], out.dy_xc[e], out.xc[e], center[e] - round_to_stats(center[e], x.dtype), rows_k, part_dy[q],
                      part_dy_xc[q], part_xc[q]);
      }
    }
  return out;
}

bool use_batch_grad_by_channel(const ChannelGeometry& g, DType dtype) {
  const std::int64_t bytes = g.n * g.c * g.s * element_size(dtype);
  // x and dy that fit in the last-level cache are read from it again by the
  // two passes, which stream sequentially: faster than by channel ([32,64,32,32]
  // float32 0.6-0.9 ms against 0.4-0.6; [32,512,14,14] 1.7 against 0.9). Planes
  // under kMinChannelPlaneBytes take a row per channel or the columns sums
  // (see batch_planes_backward).
  if (g.channels_last || g.s * element_size(dtype) < kMinChannelPlaneBytes || !runtime::use_streaming_stores(bytes))
    return false;
  const int threads = runtime::threads_for(2 * bytes);
  const std::int64_t shares = (g.c + threads - 1) / threads;  // channels of the busiest thread
  return 8 * shares * threads <= 9 * g.c;  // at most 1/8 of the threads' time idle
}

void batch_grad_by_channel(const TensorRef& x, const TensorRef& dy, const TensorRef& dx, const ChannelGeometry& g,
                           const std::vector<double>& center, const ChannelGradTerms& terms) {
  if (x.numel() == 0) return;
  const auto& kernels = runtime::active_kernels();
  const std::int64_t bytes = x.numel() * element_size(x.dtype);
  const bool stream = !core::same_memory(x, dx) && !core::same_memory(dy, dx) && runtime::use_streaming_stores(bytes);
  const AccTable ones = to_acc_table(std::vector<double>(g.n, 1.0), x.dtype);
  runtime::run_team(runtime::threads_for(2 * bytes), [&](int id, int team) {
    std::vector<double> sum_dy(g.n), sum_dy_xc(g.n), sum_xc(g.n);  // per plane (sample) of the channel
    AccTable row_center = sized_acc_table(g.n, x.dtype);
    // The channel's tables: centre rounded, scale, shift, dy_scale.
    AccTable center_t = sized_acc_table(1, x.dtype), scale_t = sized_acc_table(1, x.dtype),
             shift_t = sized_acc_table(1, x.dtype), dy_scale_t = sized_acc_table(1, x.dtype);
    const runtime::Share share = runtime::share_of(g.c, id, team);
    for (std::int64_t c = share.begin; c < share.end; ++c) {
      const PlaneRows planes{c * g.s, g.n, g.c * g.s};  // its N planes, C * S apart, in one call
      for (std::int64_t n = 0; n < g.n; ++n) row_center.set(n, center[c]);
      // Sums first (dx may be x or dy).
      kernels.rows_backward(plane_sums_problem(x, dy, g, planes, row_center.data(), ones.data(), sum_dy.data(),
                                               sum_dy_xc.data(), sum_xc.data()));
      const double shift = center[c] - round_to_stats(center[c], x.dtype);
      ChannelGradSums s;
      for (std::int64_t n = 0; n < g.n; ++n)  // merged over samples in order, as channel_grad_sums
        add_recentred(s.dy, s.dy_xc, s.xc, shift, double(g.s), sum_dy[n], sum_dy_xc[n], sum_xc[n]);
      const ChannelApplyTerms t = terms(c, s);
      const FoldedCenter f = fold_center(t.center, t.scale, t.shift, x.dtype);  // as channel_apply
      center_t.set(0, f.hi);
      scale_t.set(0, t.scale);
      shift_t.set(0, f.shift);
      dy_scale_t.set(0, t.dy_scale);
      // The planes just summed, last first while in cache.
      kernels::RowsForward apply = plane_apply_problem(x, dx, g, planes);
      apply.param_period = 1;
      apply.weight = scale_t.data();
      apply.bias = shift_t.data();
      apply.apply.center = center_t.data();
      apply.apply.dy = element_at(dy.data, planes.offset, x.dtype);
      apply.apply.dy_row_stride = planes.row_stride;
      apply.apply.dy_scale = dy_scale_t.data();
      apply.store = plain_store(x.dtype);
      apply.streaming_stores = stream;
      apply.last_first = true;
      kernels.rows_forward(apply);
    }
  });
}

}  // namespace normkit::plan
