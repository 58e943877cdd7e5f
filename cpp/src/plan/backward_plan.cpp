#include "plan/backward_plan.hpp"

#include <algorithm>

#include "core/check.hpp"
#include "runtime/dispatch.hpp"
#include "runtime/threads.hpp"

namespace normkit::plan {

namespace {

// Values of the accumulation type (stats_dtype) the kernels read.
struct AccValues {
  std::vector<float> f;
  std::vector<double> d;
  const void* data() const { return d.empty() ? static_cast<const void*>(f.data()) : d.data(); }
};

// A parameter as the kernels take it: `t` itself when it already has the
// accumulation type, else a converted copy held in `storage`.
const void* acc_params(const TensorRef& t, DType x_dtype, AccValues& storage) {
  if (!t.given) return nullptr;
  if (t.dtype == stats_dtype(x_dtype)) return t.data;
  const std::int64_t n = t.numel();
  for (std::int64_t i = 0; i < n; ++i) storage.f.push_back(static_cast<float>(read_element(t, i)));
  return storage.f.data();
}

}  // namespace

RowsParamGrads rows_backward(kernels::RowsNorm norm, const kernels::RowsForward& f, const TensorRef& dy,
                             std::int64_t dy_row_stride, const TensorRef& x, const TensorRef& mean,
                             const TensorRef& rstd, const TensorRef& weight, const TensorRef& dx,
                             bool want_param_grads) {
  const std::int64_t rows = f.rows, cols = f.cols;
  AccValues weight_acc;
  kernels::RowsBackward p;
  p.norm = norm;
  p.dtype = x.dtype;
  p.rows = rows;
  p.cols = cols;
  p.x = x.data;
  p.x_row_stride = f.x_row_stride;
  p.dy = dy.data;
  p.dy_row_stride = dy_row_stride;
  p.dx = dx.data;
  p.dx_row_stride = f.y_row_stride;
  p.weight = acc_params(weight, x.dtype, weight_acc);
  p.mean = norm == kernels::RowsNorm::layer ? mean.data : nullptr;
  p.rstd = rstd.data;
  p.block_rows = std::max<std::int64_t>(1, (rows + 63) / 64);
  const std::int64_t blocks = (rows + p.block_rows - 1) / p.block_rows;
  std::vector<float> part_f;
  std::vector<double> part_d;
  if (want_param_grads) {
    const std::size_t count = static_cast<std::size_t>(2 * blocks * cols);
    if (x.dtype == DType::float64) {
      part_d.resize(count);
      p.partial_dweight = part_d.data();
      p.partial_dbias = part_d.data() + blocks * cols;
    } else {
      part_f.resize(count);
      p.partial_dweight = part_f.data();
      p.partial_dbias = part_f.data() + blocks * cols;
    }
  }
  p.streaming_stores = f.streaming_stores && !core::same_memory(dy, dx);
  p.threads = runtime::threads_for(3 * rows * cols * element_size(x.dtype));
  runtime::active_kernels().rows_backward(p);
  RowsParamGrads out;
  if (!want_param_grads) return out;

  // Merge the block partials in block order, in double.
  auto partial = [&](int which, std::int64_t k, std::int64_t c) -> double {
    const std::int64_t i = (which * blocks + k) * cols + c;
    return x.dtype == DType::float64 ? part_d[i] : double(part_f[i]);
  };
  out.dweight.assign(cols, 0.0);
  out.dbias.assign(cols, 0.0);
  for (std::int64_t k = 0; k < blocks; ++k)
    for (std::int64_t c = 0; c < cols; ++c) {
      out.dweight[c] += partial(0, k, c);
      out.dbias[c] += partial(1, k, c);
    }
  return out;
}

namespace {
// The rows backward over segmented rows (RowsBackward, segments > 0), row r of
// `planes` planes of `cols` elements cut into `segments` runs, rows `cols`
// apart: dx, and per (row, run) sum_dy and sum_dy_xhat about the row's exact
// mean (the kernel sums about the mean rounded to the stats dtype; its row
// sums of x - mean move them). Statistics per row; weight per (row, run).
struct SegmentedRows {
  std::int64_t rows, cols, segments, planes, plane_pitch;
};
void segmented_rows_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& dx, const SegmentedRows& shape,
                             const std::vector<double>& mean, const std::vector<double>& rstd,
                             const std::vector<double>& weight, std::vector<double>& sum_dy,
                             std::vector<double>& sum_dy_xhat) {
  const std::int64_t rows = shape.rows, segments = shape.segments;
  AccValues mean_t, rstd_t, w_t;
  auto acc = [&](const std::vector<double>& v, AccValues& t) {
    if (x.dtype == DType::float64) t.d = v;
    else t.f.assign(v.begin(), v.end());
    return t.data();
  };
  std::vector<double> seg_dy(rows * segments), seg_dy_xc(rows * segments), row_xc(rows);
  kernels::RowsBackward p;
  p.norm = kernels::RowsNorm::layer;
  p.dtype = x.dtype;
  p.rows = rows;
  p.cols = shape.cols;
  p.x = x.data;
  p.x_row_stride = shape.cols;
  p.dy = dy.data;
  p.dy_row_stride = shape.cols;
  p.dx = dx.data;
  p.dx_row_stride = shape.cols;
  p.segments = segments;
  p.planes = shape.planes;
  p.plane_pitch = shape.plane_pitch;
  p.param_period = rows;  // an entry per (row, run)
  p.weight = acc(weight, w_t);
  p.mean = acc(mean, mean_t);
  p.rstd = acc(rstd, rstd_t);
  p.segment_sum_dy = seg_dy.data();
  p.segment_sum_dy_xc = seg_dy_xc.data();
  p.row_sum_xc = row_xc.data();
  const std::int64_t bytes = x.numel() * element_size(x.dtype);
  p.streaming_stores = !core::same_memory(x, dx) && !core::same_memory(dy, dx) &&
                       runtime::use_streaming_stores(bytes);
  p.threads = runtime::threads_for(3 * bytes);
  runtime::active_kernels().rows_backward(p);
  const double count = double(shape.cols * shape.planes);
  for (std::int64_t r = 0; r < rows; ++r) {
    const double delta = row_xc[r] / count;
    const double rs = x.dtype == DType::float64 ? rstd[r] : double(float(rstd[r]));
    for (std::int64_t j = 0; j < segments; ++j) {
      const std::int64_t e = r * segments + j;
      sum_dy[e] = seg_dy[e];
      sum_dy_xhat[e] = rs * (seg_dy_xc[e] - delta * seg_dy[e]);
    }
  }
}
}  // namespace

void grouped_rows_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& dx, const ChannelGeometry& g,
                           std::int64_t groups, const std::vector<double>& mean_ng,
                           const std::vector<double>& rstd_ng, const std::vector<double>& w_nc,
                           std::vector<double>& sum_dy, std::vector<double>& sum_dy_xhat) {
  // One row per (sample, group), one run per channel.
  const std::int64_t per_group = g.c / groups;
  segmented_rows_backward(dy, x, dx, {g.n * groups, per_group * g.s, per_group, 1, 0}, mean_ng, rstd_ng, w_nc, sum_dy,
                          sum_dy_xhat);
}

bool use_batch_planes_backward(const ChannelGeometry& g, DType dtype) {
  if (g.channels_last) return false;
  if (g.n == 1) return true;  // a channel's planes are one plane
  const std::int64_t plane_bytes = g.s * element_size(dtype);
  if (plane_bytes >= kMinChannelPlaneBytes) return false;
  return plane_bytes >= kMaxColumnsStatsPlaneBytes || g.n * g.c * plane_bytes <= kMaxStridedPlanesBackwardBytes;
}

void batch_planes_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& dx, const ChannelGeometry& g,
                           const std::vector<double>& mean_c, const std::vector<double>& rstd_c,
                           const std::vector<double>& w_c, std::vector<double>& sum_dy,
                           std::vector<double>& sum_dy_xhat) {
  // One row per channel: its N planes, a sample (C * S elements) apart.
  segmented_rows_backward(dy, x, dx, {g.c, g.s, 1, g.n, g.c * g.s}, mean_c, rstd_c, w_c, sum_dy, sum_dy_xhat);
}

}  // namespace normkit::plan
