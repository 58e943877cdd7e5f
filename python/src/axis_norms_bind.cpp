// axis_norms_bind.cpp - nanobind bindings of normalize, normalize_backward and
// mean_variance_norm (normkit/axis_norms.hpp).
//
// The Python layer (normkit/_axes.py) makes x (and dy) contiguous and
// allocates the output; all other validation is C++'s, with the output named
// "out" (forward) or "dx" (backward).
//   normalize(x, y, p, dim, eps, bf16)
//   normalize_backward(dy, x, dx, p, dim, eps, bf16)
//   mean_variance_norm(x, y, axes, eps, bf16)
// bf16: bfloat16 arrays arrive as uint16 views (normkit/_dtypes.py, kernel_view).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <vector>

#include "array_refs.hpp"
#include "normkit/axis_norms.hpp"

namespace nb = nanobind;
using namespace nb::literals;
using namespace normkit_python;

void bind_axis_norms(nb::module_& m) {
  m.def(
      "normalize",
      [](AnyArray x, AnyArray y, double p, int dim, double eps, bool bf16) {
        const auto xr = to_ref(x, "x", bf16), yr = to_ref(y, "out", bf16);
        KernelGilRelease release(xr.numel());
        naming_out([&] { normkit::normalize(xr, yr, p, dim, eps); });
      },
      "x"_a, "y"_a, "p"_a, "dim"_a, "eps"_a, "bf16"_a);
  m.def(
      "normalize_backward",
      [](AnyArray dy, AnyArray x, AnyArray dx, double p, int dim, double eps, bool bf16) {
        const auto dyr = to_ref(dy, "dy", bf16), xr = to_ref(x, "x", bf16), dxr = to_ref(dx, "dx", bf16);
        KernelGilRelease release(xr.numel());
        normkit::normalize_backward(dyr, xr, dxr, p, dim, eps);
      },
      "dy"_a, "x"_a, "dx"_a, "p"_a, "dim"_a, "eps"_a, "bf16"_a);
  m.def(
      "mean_variance_norm",
      [](AnyArray x, AnyArray y, std::vector<std::int64_t> axes, double eps, bool bf16) {
        const auto xr = to_ref(x, "x", bf16), yr = to_ref(y, "out", bf16);
        if (axes.size() > static_cast<std::size_t>(normkit::kMaxRank))
          throw normkit::Error(normkit::ErrorKind::value, "axes: names more axes than x can have");
        const normkit::Dims a(axes.begin(), axes.end());
        KernelGilRelease release(xr.numel());
        naming_out([&] { normkit::mean_variance_norm(xr, yr, a, eps); });
      },
      "x"_a, "y"_a, "axes"_a, "eps"_a, "bf16"_a);
}
