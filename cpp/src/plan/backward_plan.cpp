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

void grouped_rows_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& dx, const ChannelGeometry& g,
                           std::int64_t groups, const std::vector<double>& mean_ng,
                           const std::vector<double>& rstd_ng, const std::vector<double>& w_nc,
                           std::vector<double>& sum_dy, std::vector<double>& sum_dy_xhat) {
  // One row per (sample, group), one run per channel.
  const std::int64_t per_group = g.c / groups;
  const std::int64_t rows = g.n * groups, cols = per_group * g.s;
  AccValues mean_t, rstd_t, w_t;
  auto acc = [&](const std::vector<double>& v, AccValues& t) {
    if (x.dtype == DType::float64) t.d = v;
    else t.f.assign(v.begin(), v.end());
    return t.data();
  };
  std::vector<double> seg_dy(rows * per_group), seg_dy_xc(rows * per_group), row_xc(rows);
  kernels::RowsBackward p;
  p.norm = kernels::RowsNorm::layer;
  p.dtype = x.dtype;
  p.rows = rows;
  p.cols = cols;
  p.x = x.data;
  p.x_row_stride = cols;
  p.dy = dy.data;
  p.dy_row_stride = cols;
  p.dx = dx.data;
  p.dx_row_stride = cols;
  p.segments = per_group;
  p.param_period = rows;  // w_nc holds an entry per (sample, channel)
  p.weight = acc(w_nc, w_t);
  p.mean = acc(mean_ng, mean_t);
  p.rstd = acc(rstd_ng, rstd_t);
  p.segment_sum_dy = seg_dy.data();
  p.segment_sum_dy_xc = seg_dy_xc.data();
  p.row_sum_xc = row_xc.data();
  const std::int64_t bytes = x.numel() * element_size(x.dtype);
  p.streaming_stores = !core::same_memory(x, dx) && !core::same_memory(dy, dx) &&
                       runtime::use_streaming_stores(bytes);
  p.threads = runtime::threads_for(3 * bytes);
  runtime::active_kernels().rows_backward(p);
  // The kernel summed relative to the mean it read (rounded to the stats
  // dtype); row_xc moves the sums to the row's exact mean.
  for (std::int64_t r = 0; r < rows; ++r) {
    const double delta = row_xc[r] / double(cols);
    const double rs = x.dtype == DType::float64 ? rstd_ng[r] : double(float(rstd_ng[r]));
    for (std::int64_t j = 0; j < per_group; ++j) {
      const std::int64_t e = r * per_group + j;  // = n * C + c
      sum_dy[e] = seg_dy[e];
      sum_dy_xhat[e] = rs * (seg_dy_xc[e] - delta * seg_dy[e]);
    }
  }
}

}  // namespace normkit::plan
