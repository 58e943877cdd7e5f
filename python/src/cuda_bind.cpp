// cuda_bind.cpp - normkit._ext.cuda_*: the normkit::cuda entry points for CUDA
// arrays (DLPack: PyTorch CUDA tensors, CuPy arrays). The Python layer
// (normkit/_cuda.py) routes CUDA arrays here, allocates the outputs on the
// same device with the caller's library, and passes the stream to queue on
// (a cudaStream_t as an integer; 0 is the legacy default stream). In a build
// without CUDA these exist too and raise RuntimeError (normkit/cuda.hpp).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "array_refs.hpp"
#include "normkit/cuda.hpp"

namespace nb = nanobind;
using namespace nb::literals;
using namespace normkit_python;

namespace {

using Dev = DeviceArray;
using OptDev = OptDeviceArray;

cudaStream_t to_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// The kernels only queue work; the GIL is released anyway, since the stream-
// ordered allocator or a full launch queue can block.
template <class F>
void queue(F&& call) {
  nb::gil_scoped_release release;
  naming_out(call);
}

}  // namespace

void bind_cuda(nb::module_& m) {
  m.def("cuda_built", &normkit::cuda::built, "True when this normkit has the CUDA backend.");
  m.def("cuda_device_count", &normkit::cuda::device_count, "CUDA devices usable now (0 without CUDA).");

  m.def(
      "cuda_layer_norm",
      [](Dev x, Dev y, std::vector<int64_t> normalized_shape, OptDev weight, OptDev bias, double eps, OptDev mean,
         OptDev rstd, std::uintptr_t stream) {
        const auto xr = to_ref(x, "x", false), yr = to_ref(y, "out", false);
        const auto wr = to_ref(weight, "weight", false), br = to_ref(bias, "bias", false);
        const auto mr = to_ref(mean, "mean", false), rr = to_ref(rstd, "rstd", false);
        const auto shape = to_dims(normalized_shape);
        queue([&] { normkit::cuda::layer_norm(xr, yr, shape, wr, br, eps, mr, rr, to_stream(stream)); });
      },
      "x"_a, "y"_a, "normalized_shape"_a, "weight"_a.none(), "bias"_a.none(), "eps"_a, "mean"_a.none(),
      "rstd"_a.none(), "stream"_a);

  m.def(
      "cuda_rms_norm",
      [](Dev x, Dev y, std::vector<int64_t> normalized_shape, OptDev weight, std::optional<double> eps, OptDev rstd,
         std::uintptr_t stream) {
        const auto xr = to_ref(x, "x", false), yr = to_ref(y, "out", false);
        const auto wr = to_ref(weight, "weight", false), rr = to_ref(rstd, "rstd", false);
        const auto shape = to_dims(normalized_shape);
        queue([&] { normkit::cuda::rms_norm(xr, yr, shape, wr, eps, rr, to_stream(stream)); });
      },
      "x"_a, "y"_a, "normalized_shape"_a, "weight"_a.none(), "eps"_a.none(), "rstd"_a.none(), "stream"_a);

  auto running_norm = [](auto norm) {
    return [norm](Dev x, Dev y, OptDev running_mean, OptDev running_var, OptDev weight, OptDev bias, bool flag,
                  double momentum, double eps, std::optional<std::string> layout, OptDev mean, OptDev rstd,
                  std::uintptr_t stream) {
      const auto xr = to_ref(x, "x", false), yr = to_ref(y, "out", false);
      const auto rm = to_ref(running_mean, "running_mean", false), rv = to_ref(running_var, "running_var", false);
      const auto wr = to_ref(weight, "weight", false), br = to_ref(bias, "bias", false);
      const auto mr = to_ref(mean, "mean", false), rr = to_ref(rstd, "rstd", false);
      const auto lay = to_layout(layout);
      queue([&] { norm(xr, yr, rm, rv, wr, br, flag, momentum, eps, lay, mr, rr, to_stream(stream)); });
    };
  };
  m.def("cuda_batch_norm",
        running_norm([](auto&&... a) { normkit::cuda::batch_norm(a...); }), "x"_a, "y"_a,
        "running_mean"_a.none(), "running_var"_a.none(), "weight"_a.none(), "bias"_a.none(), "training"_a,
        "momentum"_a, "eps"_a, "layout"_a.none(), "mean"_a.none(), "rstd"_a.none(), "stream"_a);
  m.def("cuda_instance_norm",
        running_norm([](auto&&... a) { normkit::cuda::instance_norm(a...); }), "x"_a, "y"_a,
        "running_mean"_a.none(), "running_var"_a.none(), "weight"_a.none(), "bias"_a.none(), "use_input_stats"_a,
        "momentum"_a, "eps"_a, "layout"_a.none(), "mean"_a.none(), "rstd"_a.none(), "stream"_a);

  m.def(
      "cuda_group_norm",
      [](Dev x, Dev y, int64_t num_groups, OptDev weight, OptDev bias, double eps, std::optional<std::string> layout,
         OptDev mean, OptDev rstd, std::uintptr_t stream) {
        const auto xr = to_ref(x, "x", false), yr = to_ref(y, "out", false);
        const auto wr = to_ref(weight, "weight", false), br = to_ref(bias, "bias", false);
        const auto mr = to_ref(mean, "mean", false), rr = to_ref(rstd, "rstd", false);
        const auto lay = to_layout(layout);
        queue([&] { normkit::cuda::group_norm(xr, yr, num_groups, wr, br, eps, lay, mr, rr, to_stream(stream)); });
      },
      "x"_a, "y"_a, "num_groups"_a, "weight"_a.none(), "bias"_a.none(), "eps"_a, "layout"_a.none(),
      "mean"_a.none(), "rstd"_a.none(), "stream"_a);

  m.def(
      "cuda_adaptive_instance_norm",
      [](Dev x, Dev y, OptDev style, OptDev style_mean, OptDev style_std, double eps,
         std::optional<std::string> layout, std::uintptr_t stream) {
        const auto xr = to_ref(x, "x", false), yr = to_ref(y, "out", false);
        const auto sr = to_ref(style, "style", false);
        const auto smr = to_ref(style_mean, "style", false), ssr = to_ref(style_std, "style", false);
        const auto lay = to_layout(layout);
        queue([&] {
          if (sr.given) normkit::cuda::adaptive_instance_norm(xr, yr, sr, eps, lay, to_stream(stream));
          else normkit::cuda::adaptive_instance_norm(xr, yr, smr, ssr, eps, lay, to_stream(stream));
        });
      },
      "x"_a, "y"_a, "style"_a.none(), "style_mean"_a.none(), "style_std"_a.none(), "eps"_a, "layout"_a.none(),
      "stream"_a);

  // ---- backward (outputs allocated by the Python layer) ----
  m.def(
      "cuda_layer_norm_backward",
      [](Dev dy, Dev x, Dev mean, Dev rstd, std::vector<int64_t> normalized_shape, OptDev weight, Dev dx,
         OptDev dweight, OptDev dbias, std::uintptr_t stream) {
        const auto dyr = to_ref(dy, "dy", false), xr = to_ref(x, "x", false);
        const auto mr = to_ref(mean, "mean", false), rr = to_ref(rstd, "rstd", false);
        const auto wr = to_ref(weight, "weight", false), dxr = to_ref(dx, "dx", false);
        const auto dwr = to_ref(dweight, "dweight", false), dbr = to_ref(dbias, "dbias", false);
        const auto shape = to_dims(normalized_shape);
        queue([&] {
          normkit::cuda::layer_norm_backward(dyr, xr, mr, rr, shape, wr, dxr, dwr, dbr, to_stream(stream));
        });
      },
      "dy"_a, "x"_a, "mean"_a, "rstd"_a, "normalized_shape"_a, "weight"_a.none(), "dx"_a, "dweight"_a.none(),
      "dbias"_a.none(), "stream"_a);

  m.def(
      "cuda_rms_norm_backward",
      [](Dev dy, Dev x, Dev rstd, std::vector<int64_t> normalized_shape, OptDev weight, Dev dx, OptDev dweight,
         std::uintptr_t stream) {
        const auto dyr = to_ref(dy, "dy", false), xr = to_ref(x, "x", false);
        const auto rr = to_ref(rstd, "rstd", false), wr = to_ref(weight, "weight", false);
        const auto dxr = to_ref(dx, "dx", false), dwr = to_ref(dweight, "dweight", false);
        const auto shape = to_dims(normalized_shape);
        queue([&] { normkit::cuda::rms_norm_backward(dyr, xr, rr, shape, wr, dxr, dwr, to_stream(stream)); });
      },
      "dy"_a, "x"_a, "rstd"_a, "normalized_shape"_a, "weight"_a.none(), "dx"_a, "dweight"_a.none(), "stream"_a);

  // batch_norm_backward / instance_norm_backward:
  // (dy, x, mean, rstd, weight, dx, dweight, dbias, flag, layout, stream).
  auto running_backward = [](auto norm) {
    return [norm](Dev dy, Dev x, Dev mean, Dev rstd, OptDev weight, Dev dx, OptDev dweight, OptDev dbias, bool flag,
                  std::optional<std::string> layout, std::uintptr_t stream) {
      const auto dyr = to_ref(dy, "dy", false), xr = to_ref(x, "x", false);
      const auto mr = to_ref(mean, "mean", false), rr = to_ref(rstd, "rstd", false);
      const auto wr = to_ref(weight, "weight", false), dxr = to_ref(dx, "dx", false);
      const auto dwr = to_ref(dweight, "dweight", false), dbr = to_ref(dbias, "dbias", false);
      const auto lay = to_layout(layout);
      queue([&] { norm(dyr, xr, mr, rr, wr, dxr, dwr, dbr, flag, lay, to_stream(stream)); });
    };
  };
  m.def("cuda_batch_norm_backward",
        running_backward([](auto&&... a) { normkit::cuda::batch_norm_backward(a...); }), "dy"_a, "x"_a, "mean"_a,
        "rstd"_a, "weight"_a.none(), "dx"_a, "dweight"_a.none(), "dbias"_a.none(), "training"_a, "layout"_a.none(),
        "stream"_a);
  m.def("cuda_instance_norm_backward",
        running_backward([](auto&&... a) { normkit::cuda::instance_norm_backward(a...); }), "dy"_a, "x"_a,
        "mean"_a, "rstd"_a, "weight"_a.none(), "dx"_a, "dweight"_a.none(), "dbias"_a.none(), "use_input_stats"_a,
        "layout"_a.none(), "stream"_a);

  m.def(
      "cuda_group_norm_backward",
      [](Dev dy, Dev x, Dev mean, Dev rstd, int64_t num_groups, OptDev weight, Dev dx, OptDev dweight, OptDev dbias,
         std::optional<std::string> layout, std::uintptr_t stream) {
        const auto dyr = to_ref(dy, "dy", false), xr = to_ref(x, "x", false);
        const auto mr = to_ref(mean, "mean", false), rr = to_ref(rstd, "rstd", false);
        const auto wr = to_ref(weight, "weight", false), dxr = to_ref(dx, "dx", false);
        const auto dwr = to_ref(dweight, "dweight", false), dbr = to_ref(dbias, "dbias", false);
        const auto lay = to_layout(layout);
        queue([&] {
          normkit::cuda::group_norm_backward(dyr, xr, mr, rr, num_groups, wr, dxr, dwr, dbr, lay, to_stream(stream));
        });
      },
      "dy"_a, "x"_a, "mean"_a, "rstd"_a, "num_groups"_a, "weight"_a.none(), "dx"_a, "dweight"_a.none(),
      "dbias"_a.none(), "layout"_a.none(), "stream"_a);

  m.def(
      "cuda_adaptive_instance_norm_backward",
      [](Dev dy, Dev x, OptDev style, OptDev style_mean, OptDev style_std, double eps, Dev dx, OptDev dstyle,
         OptDev dstyle_mean, OptDev dstyle_std, std::optional<std::string> layout, std::uintptr_t stream) {
        const auto dyr = to_ref(dy, "dy", false), xr = to_ref(x, "x", false);
        const auto sr = to_ref(style, "style", false);
        const auto smr = to_ref(style_mean, "style", false), ssr = to_ref(style_std, "style", false);
        const auto dxr = to_ref(dx, "dx", false), dsr = to_ref(dstyle, "dstyle", false);
        const auto dsmr = to_ref(dstyle_mean, "dstyle", false), dssr = to_ref(dstyle_std, "dstyle", false);
        const auto lay = to_layout(layout);
        queue([&] {
          if (sr.given)
            normkit::cuda::adaptive_instance_norm_backward(dyr, xr, sr, eps, dxr, dsr, lay, to_stream(stream));
          else
            normkit::cuda::adaptive_instance_norm_backward(dyr, xr, smr, ssr, eps, dxr, dsmr, dssr, lay,
                                                           to_stream(stream));
        });
      },
      "dy"_a, "x"_a, "style"_a.none(), "style_mean"_a.none(), "style_std"_a.none(), "eps"_a, "dx"_a,
      "dstyle"_a.none(), "dstyle_mean"_a.none(), "dstyle_std"_a.none(), "layout"_a.none(), "stream"_a);
}
