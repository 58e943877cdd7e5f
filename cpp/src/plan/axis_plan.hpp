// plan/axis_plan.hpp - mapping norms over any set of axes onto the existing
// rows and columns problems: normalize (torch.nn.functional.normalize, an
// Lp norm along one dim) and mean_variance_norm (ONNX MeanVarianceNormalization).
// No kernel of their own: both are statistics per slice, then a per-slice
// affine, from the kernels of kernels/kernel_api.hpp.
//
// x (contiguous) is seen through its reduced axes. Its dims collapse into runs
// of reduced (R) and kept (K) axes (size-1 dims dropped); the innermost reduced
// run is the kernels' reduction:
//   ... R    (last run reduced)  rows: rows of the last run's extent
//            (normalize along the last dim; MVN over trailing axes)
//   ... R K  (last run kept)     columns: `batches` x `rows` (the R run) x
//            `cols` (the K run) (normalize along an inner dim)
// and every other reduced run merges the kernels' partials in double (the
// ONNX default axes (0, 2, 3) on NCHW: rows per (n, c) plane merged over n, as
// BatchNorm's channels-first statistics). So any set of axes maps without a
// transpose. A slice is one index of the kept axes, row-major over them.
//
// The view is handed to the channel plan (plan/channel_plan.hpp) as a
// geometry its helpers already serve, so the kernel problems are theirs:
//   problem  geometry                         statistics         output / dx        sum dy * x (backward)
//   rows     1 x rows channels x cols,        RowsForward layer, RowsForward        RowsBackward sums
//            channels-first                   statistics only    scale_shift        (dx = nullptr)
//   columns  batches x rows x cols channels,  ColumnsStats       ColumnsApply       ColumnsGradSums
//            channels-last, per sample        block partials
// and this plan adds the merges over the other reduced runs and the per-slice tables.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/kernel_api.hpp"
#include "normkit/tensor.hpp"

namespace normkit::plan {

struct AxisView {
  bool columns = false;                 // the columns problem (else rows)
  std::int64_t batches = 1, rows = 0, cols = 0;  // the kernel problem's extents (rows: batches = 1)
  std::int64_t slices = 0;              // number of slices (product of the kept extents)
  std::int64_t count = 0;               // elements per slice (product of the reduced extents)
  // rows: the slice of each row; columns: of each batch, times `cols` (the
  // slice of element (b, m, c) is slice_base[b] + c).
  std::vector<std::int64_t> slice_base;
};

// x: contiguous, non-empty; reduced[i]: whether axis i is reduced (rank entries).
AxisView axis_view(const TensorRef& x, const std::vector<bool>& reduced);

// Per slice: mean and M2 (sum of squared deviations), in double, from the
// kernels' shifted statistics merged in a fixed order (plan/merge.hpp).
struct SliceMoments {
  std::vector<double> mean, m2;
};
SliceMoments slice_moments(const TensorRef& x, const AxisView& v);

// Per slice: sum of dy * x (dy: x's shape, dtype and layout), in double.
std::vector<double> slice_dot(const TensorRef& dy, const TensorRef& x, const AxisView& v);

// The per-slice affine of the output, coefficients in double:
//   y = ((x - center) * a + dy * b) / den        (den == 0: y = 0)
// center and b may be empty (no centre, no dy term). The kernels apply
// scale = a / den and dy_scale = b / den as tables in the stats dtype; a slice
// whose scale that dtype cannot hold as a normal number (1/den overflows or
// underflows, e.g. eps = 1e-45 for a row of zeros) is redone by a plain loop
// in double instead, so no slice loses its result to the table's range.
struct SliceAffine {
  std::vector<double> center, a, b, den;
};
void slice_apply(const TensorRef& x, const TensorRef& y, const AxisView& v, const SliceAffine& f,
                 const TensorRef& dy = {});

// ---- plain loops (no kernel computes these) ----------------------------------
// The Lp norm of each slice for p != 2: the kernels' statistics are the first
// two moments, and sum |x|, max |x| or sum |x|^p is no function of them. One
// pass (p = 1: sum |x|; p = inf: max |x|, NaN propagating) or two (other p:
// max |x| first, then m * (sum (|x|/m)^p)^(1/p), which cannot overflow), in double.
// `only`: when given, just the slices s with only[s] (the others are 0).
std::vector<double> slice_lp_norm_plain(const TensorRef& x, const AxisView& v, double p,
                                        const std::vector<char>* only = nullptr);

// normalize's backward for p != 2, elementwise (the gradient of the norm,
// sgn(x) |x|^(p-1) / N^(p-1), or sgn(x) on the maxima for p = inf, is not an
// affine of x): dx = (dy - g * dot / N) / den where the norm is not clamped
// (norm >= eps, norm > 0), dx = dy / den where it is, dx = 0 where den == 0.
void normalize_backward_plain(const TensorRef& dy, const TensorRef& x, const TensorRef& dx, const AxisView& v,
                              double p, double eps, const std::vector<double>& norm,
                              const std::vector<double>& dot);

}  // namespace normkit::plan
