// layers_bind.cpp - nanobind bindings of the layer classes (normkit/layers.hpp).
//
// Bound as normkit._ext._LayerNorm, _RMSNorm, _BatchNorm, _InstanceNorm and
// _GroupNorm; the public classes are thin Python subclasses
// (normkit/_layers.py) that allocate outputs, convert inputs and keep x alive
// for backward (the C++ layer keeps a view of x, not a copy).
//
// Per class:
//   __init__(<PyTorch's constructor arguments>, layout (channel norms), dtype: str)
//   _forward(x, y, bf16), _backward(dy, dx, bf16)   kernels, GIL released
//   zero_grad(), _train(mode), training (read/write)
//   read-only configuration: eps, _dtype_name, _normalized_shape (rows norms),
//     num_features / num_groups / momentum / affine / ..., _layout_name (channel norms)
//   _buffer(name) -> NumPy array sharing memory with the C++ Buffer, or None
//     (names: weight, bias, grad_weight, grad_bias, running_mean, running_var;
//     bfloat16 buffers come as uint16, viewed as bfloat16 in Python)
//   _num_batches_tracked() -> 0-d int64 array sharing memory (channel norms
//     with running statistics), or None
// The arrays hold a reference to the layer object, so they stay valid as long
// as they live (Buffer storage never moves).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <string>
#include <vector>

#include "array_refs.hpp"
#include "normkit/layers.hpp"
#include "normkit/normkit.hpp"

namespace nb = nanobind;
using namespace nb::literals;
using namespace normkit_python;

namespace {

normkit::DType parse_dtype(const std::string& name) {
  for (auto d : {normkit::DType::float32, normkit::DType::float64, normkit::DType::float16, normkit::DType::bfloat16})
    if (name == normkit::to_string(d)) return d;
  throw normkit::Error(normkit::ErrorKind::type,
                       "dtype: expected float32, float64, float16 or bfloat16, got " + name);
}

// A NumPy array over a Buffer's storage, owned by (keeping alive) `owner`.
nb::object buffer_array(normkit::Buffer& b, nb::handle owner) {
  if (!b.defined()) return nb::none();
  const auto& dims = b.shape();
  size_t shape[normkit::kMaxRank];
  for (int i = 0; i < dims.size(); ++i) shape[i] = static_cast<size_t>(dims[i]);
  nb::dlpack::dtype dt;
  switch (b.dtype()) {
    case normkit::DType::float32: dt = nb::dtype<float>(); break;
    case normkit::DType::float64: dt = nb::dtype<double>(); break;
    case normkit::DType::float16: dt = {static_cast<uint8_t>(nb::dlpack::dtype_code::Float), 16, 1}; break;
    default: dt = nb::dtype<uint16_t>(); break;  // bfloat16: viewed as ml_dtypes.bfloat16 in Python
  }
  nb::ndarray<nb::numpy> a(b.data(), static_cast<size_t>(dims.size()), shape, owner, nullptr, dt);
  return nb::cast(a, nb::rv_policy::reference);
}

nb::object counter_array(std::int64_t& n, nb::handle owner) {
  nb::ndarray<nb::numpy, std::int64_t, nb::ndim<0>> a(&n, 0, nullptr, owner);
  return nb::cast(a, nb::rv_policy::reference);
}

std::optional<std::string> layout_name(const std::optional<normkit::Layout>& l) {
  if (!l) return std::nullopt;
  return std::string(normkit::to_string(*l));
}

std::vector<int64_t> dims_vector(const normkit::Dims& d) { return std::vector<int64_t>(d.begin(), d.end()); }

// What every layer class shares: kernels, training flag, gradients.
template <class L, class C>
void bind_common(C& cls) {
  cls.def(
         "_forward",
         [](L& self, AnyArray x, AnyArray y, bool bf16) {
           const auto xr = to_ref(x, "x", bf16), yr = to_ref(y, "y", bf16);
           KernelGilRelease release(xr.numel());
           self.forward(xr, yr);
         },
         "x"_a, "y"_a, "bf16"_a)
      .def(
          "_backward",
          [](L& self, AnyArray dy, AnyArray dx, bool bf16) {
            const auto dyr = to_ref(dy, "dy", bf16), dxr = to_ref(dx, "dx", bf16);
            KernelGilRelease release(dyr.numel());
            self.backward(dyr, dxr);
          },
          "dy"_a, "dx"_a, "bf16"_a)
      .def("zero_grad", &L::zero_grad, "Sets grad_weight and grad_bias to zero.")
      .def("_train", [](L& self, bool mode) { self.train(mode); }, "mode"_a)
      .def_prop_rw(
          "training", [](const L& self) { return self.training(); },
          [](L& self, bool mode) { self.train(mode); }, "Training mode (batch statistics, saves for backward).")
      .def_prop_ro("_dtype_name", [](const L& self) { return std::string(normkit::to_string(self.dtype())); })
      // The activation as the code normkit/_epilogue.py gives (0: none).
      .def("_set_activation", [](L& self, int code) { self.set_activation(static_cast<normkit::Activation>(code)); },
           "code"_a)
      .def_prop_ro("_activation_code", [](const L& self) { return static_cast<int>(self.activation()); })
      .def_prop_ro("eps", [](const L& self) { return self.eps(); });
}

template <class L>
nb::object affine_buffer(L& self, nb::handle h, const std::string& name) {
  if (name == "weight") return buffer_array(self.weight(), h);
  if (name == "bias") return buffer_array(self.bias(), h);
  if (name == "grad_weight") return buffer_array(self.grad_weight(), h);
  if (name == "grad_bias") return buffer_array(self.grad_bias(), h);
  return nb::none();
}

template <class L>
nb::object running_buffer(L& self, nb::handle h, const std::string& name) {
  if (name == "running_mean") return buffer_array(self.running_mean(), h);
  if (name == "running_var") return buffer_array(self.running_var(), h);
  return affine_buffer(self, h, name);
}

// BatchNorm and InstanceNorm share their constructor and state.
template <class L>
void bind_running(nb::module_& m, const char* name, bool affine_default, bool track_default, const char* doc) {
  nb::class_<L> cls(m, name, doc);
  cls.def(
      "__init__",
      [](L* self, int64_t num_features, double eps, std::optional<double> momentum, bool affine,
         bool track_running_stats, std::optional<std::string> layout, const std::string& dtype) {
        new (self) L(num_features, eps, momentum, affine, track_running_stats, to_layout(layout), parse_dtype(dtype));
      },
      "num_features"_a, "eps"_a = 1e-5, "momentum"_a.none() = 0.1, "affine"_a = affine_default,
      "track_running_stats"_a = track_default, "layout"_a.none() = nb::none(), "dtype"_a = "float32");
  bind_common<L>(cls);
  cls.def_prop_ro("num_features", [](const L& self) { return self.num_features(); })
      .def_prop_ro("momentum", [](const L& self) { return self.momentum(); })
      .def_prop_ro("affine", [](const L& self) { return self.affine(); })
      .def_prop_ro("track_running_stats", [](const L& self) { return self.track_running_stats(); })
      .def_prop_ro("_layout_name", [](const L& self) { return layout_name(self.layout()); })
      .def(
          "_buffer",
          [](nb::pointer_and_handle<L> s, const std::string& n) { return running_buffer(*s.p, s.h, n); }, "name"_a)
      .def("_num_batches_tracked", [](nb::pointer_and_handle<L> s) -> nb::object {
        if (!s.p->track_running_stats()) return nb::none();
        return counter_array(s.p->num_batches_tracked(), s.h);
      });
}

}  // namespace

void bind_layers(nb::module_& m) {
  {
    using L = normkit::LayerNorm;
    nb::class_<L> cls(m, "_LayerNorm", "normkit::LayerNorm (use normkit.LayerNorm).");
    cls.def(
        "__init__",
        [](L* self, std::vector<int64_t> normalized_shape, double eps, bool elementwise_affine, bool bias,
           const std::string& dtype) {
          new (self) L(to_dims(normalized_shape), eps, elementwise_affine, bias, parse_dtype(dtype));
        },
        "normalized_shape"_a, "eps"_a = 1e-5, "elementwise_affine"_a = true, "bias"_a = true,
        "dtype"_a = "float32");
    bind_common<L>(cls);
    cls.def_prop_ro("_normalized_shape", [](const L& self) { return dims_vector(self.normalized_shape()); })
        .def_prop_ro("elementwise_affine", [](const L& self) { return self.elementwise_affine(); })
        .def(
            "_buffer",
            [](nb::pointer_and_handle<L> s, const std::string& n) { return affine_buffer(*s.p, s.h, n); }, "name"_a);
  }
  {
    using L = normkit::RMSNorm;
    nb::class_<L> cls(m, "_RMSNorm", "normkit::RMSNorm (use normkit.RMSNorm).");
    cls.def(
        "__init__",
        [](L* self, std::vector<int64_t> normalized_shape, std::optional<double> eps, bool elementwise_affine,
           const std::string& dtype) {
          new (self) L(to_dims(normalized_shape), eps, elementwise_affine, parse_dtype(dtype));
        },
        "normalized_shape"_a, "eps"_a.none() = nb::none(), "elementwise_affine"_a = true, "dtype"_a = "float32");
    bind_common<L>(cls);
    cls.def_prop_ro("_normalized_shape", [](const L& self) { return dims_vector(self.normalized_shape()); })
        .def_prop_ro("elementwise_affine", [](const L& self) { return self.elementwise_affine(); })
        .def(
            "_buffer",
            [](nb::pointer_and_handle<L> s, const std::string& n) -> nb::object {
              if (n == "weight") return buffer_array(s.p->weight(), s.h);
              if (n == "grad_weight") return buffer_array(s.p->grad_weight(), s.h);
              return nb::none();
            },
            "name"_a);
  }
  bind_running<normkit::BatchNorm>(m, "_BatchNorm", true, true, "normkit::BatchNorm (use normkit.BatchNorm).");
  bind_running<normkit::InstanceNorm>(m, "_InstanceNorm", false, false,
                                      "normkit::InstanceNorm (use normkit.InstanceNorm).");
  {
    using L = normkit::GroupNorm;
    nb::class_<L> cls(m, "_GroupNorm", "normkit::GroupNorm (use normkit.GroupNorm).");
    cls.def(
        "__init__",
        [](L* self, int64_t num_groups, int64_t num_channels, double eps, bool affine,
           std::optional<std::string> layout, const std::string& dtype) {
          new (self) L(num_groups, num_channels, eps, affine, to_layout(layout), parse_dtype(dtype));
        },
        "num_groups"_a, "num_channels"_a, "eps"_a = 1e-5, "affine"_a = true, "layout"_a.none() = nb::none(),
        "dtype"_a = "float32");
    bind_common<L>(cls);
    cls.def_prop_ro("num_groups", [](const L& self) { return self.num_groups(); })
        .def_prop_ro("num_channels", [](const L& self) { return self.num_channels(); })
        .def_prop_ro("affine", [](const L& self) { return self.affine(); })
        .def_prop_ro("_layout_name", [](const L& self) { return layout_name(self.layout()); })
        .def(
            "_buffer",
            [](nb::pointer_and_handle<L> s, const std::string& n) { return affine_buffer(*s.p, s.h, n); }, "name"_a);
  }
}
