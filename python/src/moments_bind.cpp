// moments_bind.cpp - normkit/moments.hpp for the Python layer (normkit/_moments.py):
// a Moments travels as (shape, count, mean, m2) with float64 NumPy arrays, so
// that the Python Moments pickles and its arrays go to MPI's buffer collectives.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <tuple>
#include <vector>

#include "array_refs.hpp"

namespace nb = nanobind;
using namespace nb::literals;
using namespace normkit_python;

namespace {

using F64Array = nb::ndarray<const double, nb::c_contig, nb::device::cpu>;
using MomentsTuple = std::tuple<std::vector<int64_t>, int64_t, nb::object, nb::object>;

// A float64 NumPy array of `shape` that owns `values` (moved to the heap).
nb::object owned_array(std::vector<double>&& values, const normkit::Dims& shape) {
  auto* heap = new std::vector<double>(std::move(values));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<double>*>(p); });
  size_t dims[normkit::kMaxRank];
  for (int i = 0; i < shape.size(); ++i) dims[i] = static_cast<size_t>(shape[i]);
  nb::ndarray<nb::numpy, double> a(heap->data(), static_cast<size_t>(shape.size()), dims, owner);
  return nb::cast(a, nb::rv_policy::reference);
}

MomentsTuple to_tuple(normkit::Moments&& m) {
  const normkit::Dims shape = m.shape;
  return {std::vector<int64_t>(shape.begin(), shape.end()), m.count, owned_array(std::move(m.mean), shape),
          owned_array(std::move(m.m2), shape)};
}

std::vector<double> values_of(const F64Array& a) { return std::vector<double>(a.data(), a.data() + a.size()); }

normkit::Moments from_parts(const std::vector<int64_t>& shape, int64_t count, const F64Array& mean,
                            const F64Array& m2) {
  normkit::Moments m;
  m.shape = to_dims(shape);
  m.count = count;
  m.mean = values_of(mean);
  m.m2 = values_of(m2);
  return m;
}

normkit::BatchNormGradSums grad_sums(int64_t count, const F64Array& sum_dy, const F64Array& sum_dy_xmu) {
  normkit::BatchNormGradSums s;
  s.count = count;
  s.sum_dy = values_of(sum_dy);
  s.sum_dy_xmu = values_of(sum_dy_xmu);
  return s;
}

}  // namespace

void bind_moments(nb::module_& m) {
  m.def(
      "moments",
      [](const std::string& norm, AnyArray x, std::optional<std::string> layout, int64_t num_groups,
         std::vector<int64_t> normalized_shape, bool bf16) {
        const auto xr = to_ref(x, "x", bf16);
        const auto lay = to_layout(layout);
        normkit::Moments out;
        {
          KernelGilRelease release(xr.numel());
          if (norm == "batch") out = normkit::batch_norm_moments(xr, lay);
          else if (norm == "instance") out = normkit::instance_norm_moments(xr, lay);
          else if (norm == "group") out = normkit::group_norm_moments(xr, num_groups, lay);
          else out = normkit::layer_norm_moments(xr, to_dims(normalized_shape));
        }
        return to_tuple(std::move(out));
      },
      "norm"_a, "x"_a, "layout"_a.none(), "num_groups"_a, "normalized_shape"_a, "bf16"_a,
      "(shape, count, mean, m2) of a norm's statistics over x (normkit/moments.hpp).");

  m.def(
      "merge_moments",
      [](std::vector<int64_t> shape, std::vector<int64_t> counts, std::vector<F64Array> means,
         std::vector<F64Array> m2s) {
        std::vector<normkit::Moments> parts;
        std::vector<const normkit::Moments*> refs;
        parts.reserve(counts.size());
        for (size_t i = 0; i < counts.size(); ++i) {
          parts.push_back(from_parts(shape, counts[i], means[i], m2s[i]));
          refs.push_back(&parts.back());
        }
        return to_tuple(normkit::merge_moments(refs));
      },
      "shape"_a, "counts"_a, "means"_a, "m2s"_a, "Merges parts (same shape) in order: (shape, count, mean, m2).");

  m.def(
      "batch_norm_with_stats",
      [](AnyArray x, AnyArray y, std::vector<int64_t> stats_shape, int64_t count, F64Array stats_mean,
         F64Array stats_m2, OptArray running_mean, OptArray running_var, OptArray weight, OptArray bias, double momentum, double eps,
         std::optional<std::string> layout, OptArray mean, OptArray rstd, bool bf16, int activation, int quantize,
         std::optional<double> scale) {
        const auto stats = from_parts(stats_shape, count, stats_mean, stats_m2);
        const RunningNormRefs r = running_norm_refs(x, y, running_mean, running_var, weight, bias, layout, mean, rstd,
                                                    bf16, activation, quantize, scale);
        KernelGilRelease release(r.x.numel());
        naming_out([&] {
          normkit::batch_norm_with_stats(r.x, r.y, stats, r.running_mean, r.running_var, r.weight, r.bias, momentum,
                                         eps, r.layout, r.mean, r.rstd, r.epilogue);
        });
      },
      "x"_a, "y"_a, "stats_shape"_a, "count"_a, "stats_mean"_a, "stats_m2"_a, "running_mean"_a.none(), "running_var"_a.none(),
      "weight"_a.none(), "bias"_a.none(), "momentum"_a, "eps"_a, "layout"_a.none(), "mean"_a.none(),
      "rstd"_a.none(), "bf16"_a, "activation"_a = 0, "quantize"_a = 0, "scale"_a.none() = nb::none());

  m.def(
      "batch_norm_grad_sums",
      [](AnyArray dy, AnyArray x, AnyArray mean, std::optional<std::string> layout, bool bf16) {
        const auto dyr = to_ref(dy, "dy", bf16), xr = to_ref(x, "x", bf16), mr = to_ref(mean, "mean", false);
        const auto lay = to_layout(layout);
        normkit::BatchNormGradSums s;
        {
          KernelGilRelease release(xr.numel());
          s = normkit::batch_norm_grad_sums(dyr, xr, mr, lay);
        }
        const normkit::Dims shape{static_cast<int64_t>(s.sum_dy.size())};
        return std::make_tuple(s.count, owned_array(std::move(s.sum_dy), shape),
                               owned_array(std::move(s.sum_dy_xmu), shape));
      },
      "dy"_a, "x"_a, "mean"_a, "layout"_a.none(), "bf16"_a, "(count, sum_dy, sum_dy_xmu) of this part.");

  m.def(
      "batch_norm_backward_with_sums",
      [](AnyArray dy, AnyArray x, AnyArray mean, AnyArray rstd, int64_t count, F64Array sum_dy,
         F64Array sum_dy_xmu, OptArray weight, AnyArray dx, OptArray dweight, OptArray dbias,
         std::optional<std::string> layout, bool bf16) {
        const auto dyr = to_ref(dy, "dy", bf16), xr = to_ref(x, "x", bf16), dxr = to_ref(dx, "dx", bf16);
        const auto mr = to_ref(mean, "mean", false), rr = to_ref(rstd, "rstd", false);
        const auto wr = to_ref(weight, "weight", bf16);
        const auto dwr = to_ref(dweight, "dweight", bf16), dbr = to_ref(dbias, "dbias", bf16);
        const auto sums = grad_sums(count, sum_dy, sum_dy_xmu);
        const auto lay = to_layout(layout);
        KernelGilRelease release(xr.numel());
        normkit::batch_norm_backward_with_sums(dyr, xr, mr, rr, sums, wr, dxr, dwr, dbr, lay);
      },
      "dy"_a, "x"_a, "mean"_a, "rstd"_a, "count"_a, "sum_dy"_a, "sum_dy_xmu"_a, "weight"_a.none(), "dx"_a,
      "dweight"_a.none(), "dbias"_a.none(), "layout"_a.none(), "bf16"_a);
}
