// normkit._ext - the nanobind module behind the normkit Python package.
//
// Arrays arrive as nb::ndarray (NumPy through the buffer protocol or DLPack,
// and anything else speaking DLPack), become normkit::TensorRef views without
// a copy, and go to the same C++ entry points an engine calls. The Python
// layer (normkit/_functional.py) allocates outputs and checks what only it
// knows; all other validation is C++'s, with the output named "out" as in
// the Python API.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <string>
#include <vector>

#include "normkit/normkit.hpp"
#include "array_refs.hpp"
#include "output_cache.hpp"
#include "plan/rows_plan.hpp"

namespace nb = nanobind;
using namespace nb::literals;

using namespace normkit_python;

void bind_layers(nb::module_& m);  // layers_bind.cpp
void bind_fold(nb::module_& m);    // fold_bind.cpp (after bind_layers: adds _BatchNorm._fold)
void bind_cuda(nb::module_& m);    // cuda_bind.cpp
void bind_moments(nb::module_& m); // moments_bind.cpp
void bind_axis_norms(nb::module_& m);  // axis_norms_bind.cpp
void bind_dlpack(nb::module_& m);  // dlpack_bind.cpp

NB_MODULE(_ext, m) {
  m.doc() = "normkit's compiled core. Use the functions of the `normkit` package.";
  m.attr("__version__") = NORMKIT_VERSION_STRING;

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const normkit::Error& e) {
      PyObject* type = e.kind() == normkit::ErrorKind::type      ? PyExc_TypeError
                       : e.kind() == normkit::ErrorKind::runtime ? PyExc_RuntimeError
                                                                 : PyExc_ValueError;
      PyErr_SetString(type, e.what());
    }
  });

  // The forward functions take the store stage as (activation, quantize, scale,
  // scales): codes from normkit/_epilogue.py; `scales` is the dynamic-scales output.
  m.def(
      "layer_norm",
      [](AnyArray x, AnyArray y, std::vector<int64_t> normalized_shape, OptArray weight, OptArray bias,
         double eps, OptArray mean, OptArray rstd, bool bf16, int activation, int quantize,
         std::optional<double> scale, OptArray scales) {
        const auto xr = to_ref(x, "x", bf16), yr = to_ref(y, "out", bf16, quantize == 2);
        const auto wr = to_ref(weight, "weight", bf16), br = to_ref(bias, "bias", bf16);
        const auto mr = to_ref(mean, "mean", false), rr = to_ref(rstd, "rstd", false);
        const auto e = to_epilogue(activation, quantize, scale, to_ref(scales, "scales", false));
        const auto problem = normkit::plan::plan_rows_forward(normkit::kernels::RowsNorm::layer, xr, yr,
                                                              to_dims(normalized_shape), wr, br, eps, mr, rr, "out", e);
        KernelGilRelease release(problem.rows * problem.cols);
        normkit::plan::run_rows_forward(problem, mr, rr);
      },
      "x"_a, "y"_a, "normalized_shape"_a, "weight"_a.none(), "bias"_a.none(), "eps"_a, "mean"_a.none(),
      "rstd"_a.none(), "bf16"_a, "activation"_a = 0, "quantize"_a = 0, "scale"_a.none() = nb::none(),
      "scales"_a.none() = nb::none());

  m.def(
      "rms_norm",
      [](AnyArray x, AnyArray y, std::vector<int64_t> normalized_shape, OptArray weight, std::optional<double> eps,
         OptArray rstd, bool bf16, int activation, int quantize, std::optional<double> scale, OptArray scales) {
        const auto xr = to_ref(x, "x", bf16), yr = to_ref(y, "out", bf16, quantize == 2);
        const auto wr = to_ref(weight, "weight", bf16), rr = to_ref(rstd, "rstd", false);
        const auto e = to_epilogue(activation, quantize, scale, to_ref(scales, "scales", false));
        const auto problem = normkit::plan::plan_rows_forward(normkit::kernels::RowsNorm::rms, xr, yr,
                                                              to_dims(normalized_shape), wr, {}, eps, {}, rr, "out", e);
        KernelGilRelease release(problem.rows * problem.cols);
        normkit::plan::run_rows_forward(problem, {}, rr);
      },
      "x"_a, "y"_a, "normalized_shape"_a, "weight"_a.none(), "eps"_a.none(), "rstd"_a.none(), "bf16"_a,
      "activation"_a = 0, "quantize"_a = 0, "scale"_a.none() = nb::none(), "scales"_a.none() = nb::none());

  // add_layer_norm (rms: false) and add_rms_norm (rms: true) share one binding.
  m.def(
      "add_rows_norm",
      [](bool rms, AnyArray x, AnyArray residual, AnyArray y, AnyArray sum, std::vector<int64_t> normalized_shape,
         OptArray weight, OptArray bias, std::optional<double> eps, OptArray residual_bias, OptArray mean,
         OptArray rstd, bool bf16, int activation, int quantize, std::optional<double> scale, OptArray scales) {
        const auto xr = to_ref(x, "x", bf16), yr = to_ref(y, "out", bf16, quantize == 2);
        const auto res = to_ref(residual, "residual", bf16), sr = to_ref(sum, "sum_out", bf16);
        const auto wr = to_ref(weight, "weight", bf16), br = to_ref(bias, "bias", bf16);
        const auto rb = to_ref(residual_bias, "residual_bias", bf16);
        const auto mr = to_ref(mean, "mean", false), rr = to_ref(rstd, "rstd", false);
        const auto e = to_epilogue(activation, quantize, scale, to_ref(scales, "scales", false));
        const auto shape = to_dims(normalized_shape);
        const auto norm = rms ? normkit::kernels::RowsNorm::rms : normkit::kernels::RowsNorm::layer;
        auto problem = normkit::plan::plan_rows_forward(norm, xr, yr, shape, wr, br, rms ? eps : eps.value_or(1e-5),
                                                        mr, rr, "out", e);
        normkit::plan::plan_residual(problem, xr, res, rb, sr, yr, wr, br, shape, "out", "sum_out");
        KernelGilRelease release(problem.rows * problem.cols);
        normkit::plan::run_rows_forward(problem, mr, rr);
      },
      "rms"_a, "x"_a, "residual"_a, "y"_a, "sum"_a, "normalized_shape"_a, "weight"_a.none(), "bias"_a.none(),
      "eps"_a.none(), "residual_bias"_a.none(), "mean"_a.none(), "rstd"_a.none(), "bf16"_a, "activation"_a,
      "quantize"_a, "scale"_a.none(), "scales"_a.none());

  nb::enum_<normkit::Layout>(m, "Layout", "Where the channel axis is (N: batch, C: channels, L/H/W/D: spatial).")
      .value("NC", normkit::Layout::NC)
      .value("NCL", normkit::Layout::NCL)
      .value("NLC", normkit::Layout::NLC)
      .value("NCHW", normkit::Layout::NCHW)
      .value("NHWC", normkit::Layout::NHWC)
      .value("NCDHW", normkit::Layout::NCDHW)
      .value("NDHWC", normkit::Layout::NDHWC);

  // batch_norm and instance_norm share one C++ signature:
  // (x, y, running_mean, running_var, weight, bias, flag, momentum, eps, layout, mean, rstd).
  auto running_norm = [](auto norm) {
    return [norm](AnyArray x, AnyArray y, OptArray running_mean, OptArray running_var, OptArray weight,
                  OptArray bias, bool flag, double momentum, double eps, std::optional<std::string> layout,
                  OptArray mean, OptArray rstd, bool bf16, int activation, int quantize, std::optional<double> scale) {
      const RunningNormRefs r = running_norm_refs(x, y, running_mean, running_var, weight, bias, layout, mean, rstd,
                                                  bf16, activation, quantize, scale);
      KernelGilRelease release(r.x.numel());
      naming_out([&] {
        norm(r.x, r.y, r.running_mean, r.running_var, r.weight, r.bias, flag, momentum, eps, r.layout, r.mean, r.rstd,
             r.epilogue);
      });
    };
  };
  m.def("batch_norm", running_norm(&normkit::batch_norm), "x"_a, "y"_a, "running_mean"_a.none(),
        "running_var"_a.none(), "weight"_a.none(), "bias"_a.none(), "training"_a, "momentum"_a, "eps"_a,
        "layout"_a.none(), "mean"_a.none(), "rstd"_a.none(), "bf16"_a, "activation"_a = 0, "quantize"_a = 0,
        "scale"_a.none() = nb::none());
  m.def("instance_norm", running_norm(&normkit::instance_norm), "x"_a, "y"_a, "running_mean"_a.none(),
        "running_var"_a.none(), "weight"_a.none(), "bias"_a.none(), "use_input_stats"_a, "momentum"_a, "eps"_a,
        "layout"_a.none(), "mean"_a.none(), "rstd"_a.none(), "bf16"_a, "activation"_a = 0, "quantize"_a = 0,
        "scale"_a.none() = nb::none());

  m.def(
      "group_norm",
      [](AnyArray x, AnyArray y, int64_t num_groups, OptArray weight, OptArray bias, double eps,
         std::optional<std::string> layout, OptArray mean, OptArray rstd, bool bf16, int activation, int quantize,
         std::optional<double> scale) {
        const auto xr = to_ref(x, "x", bf16), yr = to_ref(y, "out", bf16, quantize == 2);
        const auto e = to_epilogue(activation, quantize, scale, {});
        const auto wr = to_ref(weight, "weight", bf16), br = to_ref(bias, "bias", bf16);
        const auto mr = to_ref(mean, "mean", false), rr = to_ref(rstd, "rstd", false);
        const auto lay = to_layout(layout);
        KernelGilRelease release(xr.numel());
        naming_out([&] { normkit::group_norm(xr, yr, num_groups, wr, br, eps, lay, mr, rr, e); });
      },
      "x"_a, "y"_a, "num_groups"_a, "weight"_a.none(), "bias"_a.none(), "eps"_a, "layout"_a.none(),
      "mean"_a.none(), "rstd"_a.none(), "bf16"_a, "activation"_a = 0, "quantize"_a = 0, "scale"_a.none() = nb::none());

  m.def(
      "adaptive_instance_norm",
      [](AnyArray x, AnyArray y, OptArray style, OptArray style_mean, OptArray style_std, double eps,
         std::optional<std::string> layout, bool bf16, int activation) {
        const auto e = to_epilogue(activation, 0, std::nullopt, {});
        const auto xr = to_ref(x, "x", bf16), yr = to_ref(y, "out", bf16);
        const auto sr = to_ref(style, "style", bf16);
        const auto smr = to_ref(style_mean, "style", bf16), ssr = to_ref(style_std, "style", bf16);
        const auto lay = to_layout(layout);
        KernelGilRelease release(xr.numel());
        naming_out([&] {
          if (sr.given) normkit::adaptive_instance_norm(xr, yr, sr, eps, lay, e);
          else normkit::adaptive_instance_norm(xr, yr, smr, ssr, eps, lay, e);
        });
      },
      "x"_a, "y"_a, "style"_a.none(), "style_mean"_a.none(), "style_std"_a.none(), "eps"_a, "layout"_a.none(),
      "bf16"_a, "activation"_a = 0);

  // ---- backward: outputs (dx, dweight, dbias, dstyle...) are allocated by the Python layer.
  m.def(
      "layer_norm_backward",
      [](AnyArray dy, AnyArray x, AnyArray mean, AnyArray rstd, std::vector<int64_t> normalized_shape,
         OptArray weight, AnyArray dx, OptArray dweight, OptArray dbias, bool bf16) {
        const auto dyr = to_ref(dy, "dy", bf16), xr = to_ref(x, "x", bf16), dxr = to_ref(dx, "dx", bf16);
        const auto mr = to_ref(mean, "mean", false), rr = to_ref(rstd, "rstd", false);
        const auto wr = to_ref(weight, "weight", bf16);
        const auto dwr = to_ref(dweight, "dweight", bf16), dbr = to_ref(dbias, "dbias", bf16);
        KernelGilRelease release(xr.numel());
        normkit::layer_norm_backward(dyr, xr, mr, rr, to_dims(normalized_shape), wr, dxr, dwr, dbr);
      },
      "dy"_a, "x"_a, "mean"_a, "rstd"_a, "normalized_shape"_a, "weight"_a.none(), "dx"_a, "dweight"_a.none(),
      "dbias"_a.none(), "bf16"_a);
  m.def(
      "rms_norm_backward",
      [](AnyArray dy, AnyArray x, AnyArray rstd, std::vector<int64_t> normalized_shape, OptArray weight,
         AnyArray dx, OptArray dweight, bool bf16) {
        const auto dyr = to_ref(dy, "dy", bf16), xr = to_ref(x, "x", bf16), dxr = to_ref(dx, "dx", bf16);
        const auto rr = to_ref(rstd, "rstd", false), wr = to_ref(weight, "weight", bf16);
        const auto dwr = to_ref(dweight, "dweight", bf16);
        KernelGilRelease release(xr.numel());
        normkit::rms_norm_backward(dyr, xr, rr, to_dims(normalized_shape), wr, dxr, dwr);
      },
      "dy"_a, "x"_a, "rstd"_a, "normalized_shape"_a, "weight"_a.none(), "dx"_a, "dweight"_a.none(), "bf16"_a);

  // batch_norm_backward and instance_norm_backward share one C++ signature.
  auto channel_backward = [](auto norm) {
    return [norm](AnyArray dy, AnyArray x, AnyArray mean, AnyArray rstd, OptArray weight, AnyArray dx,
                  OptArray dweight, OptArray dbias, bool flag, std::optional<std::string> layout, bool bf16) {
      const auto dyr = to_ref(dy, "dy", bf16), xr = to_ref(x, "x", bf16), dxr = to_ref(dx, "dx", bf16);
      const auto mr = to_ref(mean, "mean", false), rr = to_ref(rstd, "rstd", false);
      const auto wr = to_ref(weight, "weight", bf16);
      const auto dwr = to_ref(dweight, "dweight", bf16), dbr = to_ref(dbias, "dbias", bf16);
      const auto lay = to_layout(layout);
      KernelGilRelease release(xr.numel());
      norm(dyr, xr, mr, rr, wr, dxr, dwr, dbr, flag, lay);
    };
  };
  m.def("batch_norm_backward", channel_backward(&normkit::batch_norm_backward), "dy"_a, "x"_a, "mean"_a, "rstd"_a,
        "weight"_a.none(), "dx"_a, "dweight"_a.none(), "dbias"_a.none(), "training"_a, "layout"_a.none(), "bf16"_a);
  m.def("instance_norm_backward", channel_backward(&normkit::instance_norm_backward), "dy"_a, "x"_a, "mean"_a,
        "rstd"_a, "weight"_a.none(), "dx"_a, "dweight"_a.none(), "dbias"_a.none(), "use_input_stats"_a,
        "layout"_a.none(), "bf16"_a);
  m.def(
      "group_norm_backward",
      [](AnyArray dy, AnyArray x, AnyArray mean, AnyArray rstd, int64_t num_groups, OptArray weight, AnyArray dx,
         OptArray dweight, OptArray dbias, std::optional<std::string> layout, bool bf16) {
        const auto dyr = to_ref(dy, "dy", bf16), xr = to_ref(x, "x", bf16), dxr = to_ref(dx, "dx", bf16);
        const auto mr = to_ref(mean, "mean", false), rr = to_ref(rstd, "rstd", false);
        const auto wr = to_ref(weight, "weight", bf16);
        const auto dwr = to_ref(dweight, "dweight", bf16), dbr = to_ref(dbias, "dbias", bf16);
        const auto lay = to_layout(layout);
        KernelGilRelease release(xr.numel());
        normkit::group_norm_backward(dyr, xr, mr, rr, num_groups, wr, dxr, dwr, dbr, lay);
      },
      "dy"_a, "x"_a, "mean"_a, "rstd"_a, "num_groups"_a, "weight"_a.none(), "dx"_a, "dweight"_a.none(),
      "dbias"_a.none(), "layout"_a.none(), "bf16"_a);
  m.def(
      "adaptive_instance_norm_backward",
      [](AnyArray dy, AnyArray x, OptArray style, OptArray style_mean, OptArray style_std, double eps, AnyArray dx,
         OptArray dstyle, OptArray dstyle_mean, OptArray dstyle_std, std::optional<std::string> layout, bool bf16) {
        const auto dyr = to_ref(dy, "dy", bf16), xr = to_ref(x, "x", bf16), dxr = to_ref(dx, "dx", bf16);
        const auto sr = to_ref(style, "style", bf16), dsr = to_ref(dstyle, "dstyle", bf16);
        const auto smr = to_ref(style_mean, "style", bf16), ssr = to_ref(style_std, "style", bf16);
        const auto dsmr = to_ref(dstyle_mean, "dstyle", bf16), dssr = to_ref(dstyle_std, "dstyle", bf16);
        const auto lay = to_layout(layout);
        KernelGilRelease release(xr.numel());
        if (sr.given) normkit::adaptive_instance_norm_backward(dyr, xr, sr, eps, dxr, dsr, lay);
        else normkit::adaptive_instance_norm_backward(dyr, xr, smr, ssr, eps, dxr, dsmr, dssr, lay);
      },
      "dy"_a, "x"_a, "style"_a.none(), "style_mean"_a.none(), "style_std"_a.none(), "eps"_a, "dx"_a,
      "dstyle"_a.none(), "dstyle_mean"_a.none(), "dstyle_std"_a.none(), "layout"_a.none(), "bf16"_a);

  m.def(
      "rows_viewable",
      [](AnyArray x, int normalized_ndim, bool bf16) {
        normkit::plan::RowsView view;
        return normkit::plan::as_rows(to_ref(x, "x", bf16), normalized_ndim, view);
      },
      "x"_a, "normalized_ndim"_a, "bf16"_a,
      "Whether x can be normalized over its trailing dims without a copy.");

  m.def("machine_epsilon", [](const std::string& dtype) {
    for (auto d : {normkit::DType::float32, normkit::DType::float64, normkit::DType::float16, normkit::DType::bfloat16})
      if (dtype == normkit::to_string(d)) return normkit::machine_epsilon(d);
    throw normkit::Error(normkit::ErrorKind::type, "dtype: not a normkit dtype: " + dtype);
  });

  m.def(
      "cached_buffer",
      [](size_t nbytes) {
        using normkit_python::OutputCache;
        void* p = OutputCache::instance().acquire(nbytes);
        if (p == nullptr) throw std::bad_alloc();
        // The capsule owns (pointer, size) so that release() can file the buffer by size.
        struct Block {
          void* data;
          size_t bytes;
        };
        auto* block = new Block{p, nbytes};
        nb::capsule keeper(block, [](void* b) noexcept {
          auto* blk = static_cast<Block*>(b);
          OutputCache::instance().release(blk->data, blk->bytes);
          delete blk;
        });
        size_t shape[1] = {nbytes};
        return nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(p, 1, shape, keeper);
      },
      "nbytes"_a, "A 1-D uint8 NumPy array of nbytes from the output cache (on a 2 MiB boundary).");
  m.def(
      "set_output_cache_limit",
      [](int64_t bytes) {
        if (bytes < 0) throw normkit::Error(normkit::ErrorKind::value, "nbytes: must be >= 0");
        normkit_python::OutputCache::instance().set_limit(static_cast<size_t>(bytes));
      },
      "nbytes"_a);
  m.def("output_cache_info", [] {
    auto& cache = normkit_python::OutputCache::instance();
    nb::dict d;
    d["limit"] = cache.limit();
    d["cached"] = cache.cached_bytes();
    return d;
  });

  m.def("set_num_threads", &normkit::set_num_threads, "n"_a);
  m.def("get_num_threads", &normkit::get_num_threads);
  m.def("kernel_path", &normkit::kernel_path);
  m.def("set_kernel_path", &normkit::set_kernel_path, "name"_a);

  m.def("info", [] {
    const auto info = normkit::runtime_info();
    nb::dict build;
    build["compiler"] = info.build.compiler;
    build["kernel_flags"] = info.build.kernel_flags;
    build["openmp"] = info.build.openmp;
    nb::dict d;
    d["version"] = info.build.version;
    d["cpu_features"] = info.cpu_features;
    d["kernel_path"] = info.kernel_path;
    d["kernel_paths_compiled"] = info.kernel_paths_compiled;
    d["kernel_paths_supported"] = info.kernel_paths_supported;
    d["num_threads"] = info.num_threads;
    d["openmp"] = info.build.openmp;
    d["cuda_built"] = info.build.cuda_built;
    d["cuda_devices"] = info.cuda_devices;
    d["build"] = build;
    return d;
  });

  bind_layers(m);
  bind_fold(m);
  bind_cuda(m);
  bind_moments(m);
  bind_axis_norms(m);
  bind_dlpack(m);
}
