// array_refs.hpp - shared by the binding files: NumPy/DLPack arrays to normkit
// views, the GIL release around kernels, and the C++ -> Python argument naming.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <optional>
#include <string>
#include <vector>

#include "normkit/normkit.hpp"

namespace normkit_python {

namespace nb = nanobind;

using AnyArray = nb::ndarray<nb::ro, nb::device::cpu>;
using OptArray = std::optional<AnyArray>;
// Arrays in CUDA device memory (PyTorch CUDA tensors, CuPy arrays, through DLPack).
using DeviceArray = nb::ndarray<nb::ro, nb::device::cuda>;
using OptDeviceArray = std::optional<DeviceArray>;

// DLPack dtype -> normkit dtype. `bf16_as_uint16`: the Python layer passes
// ml_dtypes bfloat16 arrays as uint16 views (NumPy cannot export bfloat16);
// `fp8_as_uint8` likewise float8_e4m3fn outputs as uint8 views. int8 is
// accepted here and refused by the core wherever it is not a quantized output.
template <class Array>
inline normkit::DType to_dtype(const Array& a, const char* argument, bool bf16_as_uint16, bool fp8_as_uint8 = false) {
  const auto dt = a.dtype();
  using code = nb::dlpack::dtype_code;
  if (dt.lanes == 1) {
    if (dt.code == static_cast<uint8_t>(code::Float)) {
      if (dt.bits == 32) return normkit::DType::float32;
      if (dt.bits == 64) return normkit::DType::float64;
      if (dt.bits == 16) return normkit::DType::float16;
    }
    if (dt.code == static_cast<uint8_t>(code::Bfloat) && dt.bits == 16) return normkit::DType::bfloat16;
    if (bf16_as_uint16 && dt.code == static_cast<uint8_t>(code::UInt) && dt.bits == 16)
      return normkit::DType::bfloat16;
    if (dt.code == static_cast<uint8_t>(code::Int) && dt.bits == 8) return normkit::DType::int8;
    if (fp8_as_uint8 && dt.code == static_cast<uint8_t>(code::UInt) && dt.bits == 8)
      return normkit::DType::float8_e4m3;
  }
  throw normkit::Error(normkit::ErrorKind::type,
                       std::string(argument) +
                           ": expected a floating-point array (float32, float64, float16 or bfloat16)");
}

template <class... Args>
inline normkit::TensorRef to_ref(const nb::ndarray<Args...>& a, const char* argument, bool bf16, bool fp8 = false) {
  if (a.ndim() > static_cast<size_t>(normkit::kMaxRank))
    throw normkit::Error(normkit::ErrorKind::value, std::string(argument) + ": " + std::to_string(a.ndim()) +
                                                        " dimensions exceed normkit's maximum of " +
                                                        std::to_string(normkit::kMaxRank));
  normkit::Dims shape, strides;
  for (size_t i = 0; i < a.ndim(); ++i) {
    shape.push_back(static_cast<int64_t>(a.shape(i)));
    strides.push_back(static_cast<int64_t>(a.stride(i)));
  }
  return normkit::TensorRef(const_cast<void*>(a.data()), to_dtype(a, argument, bf16, fp8), shape, strides);
}

template <class... Args>
inline normkit::TensorRef to_ref(const std::optional<nb::ndarray<Args...>>& a, const char* argument, bool bf16,
                                 bool fp8 = false) {
  return a ? to_ref(*a, argument, bf16, fp8) : normkit::TensorRef{};
}

// The store stage from the Python layer's codes (normkit/_epilogue.py checks
// the names): activation 0..4 and quantize 0..2 in the C++ enums' order.
inline normkit::Epilogue to_epilogue(int activation, int quantize, std::optional<double> scale,
                                     const normkit::TensorRef& scales) {
  normkit::Epilogue e;
  e.activation = static_cast<normkit::Activation>(activation);
  e.quantize = static_cast<normkit::Quantize>(quantize);
  e.scale = scale;
  e.scales = scales;
  return e;
}

inline normkit::Dims to_dims(const std::vector<int64_t>& v) {
  if (v.size() > static_cast<size_t>(normkit::kMaxRank))
    throw normkit::Error(normkit::ErrorKind::value, "normalized_shape: " + std::to_string(v.size()) +
                                                        " dimensions exceed normkit's maximum of " +
                                                        std::to_string(normkit::kMaxRank));
  return normkit::Dims(v.begin(), v.end());
}

inline std::optional<normkit::Layout> to_layout(const std::optional<std::string>& name) {
  if (!name) return std::nullopt;
  return normkit::parse_layout(*name, "layout");
}

// The arguments of the running-statistics norms (batch_norm, instance_norm,
// batch_norm_with_stats) as views; errors about y name it "out".
struct RunningNormRefs {
  normkit::TensorRef x, y, running_mean, running_var, weight, bias, mean, rstd;
  normkit::Epilogue epilogue;
  std::optional<normkit::Layout> layout;
};
inline RunningNormRefs running_norm_refs(const AnyArray& x, const AnyArray& y, const OptArray& running_mean,
                                         const OptArray& running_var, const OptArray& weight, const OptArray& bias,
                                         const std::optional<std::string>& layout, const OptArray& mean,
                                         const OptArray& rstd, bool bf16, int activation, int quantize,
                                         std::optional<double> scale) {
  RunningNormRefs r;
  r.x = to_ref(x, "x", bf16);
  r.y = to_ref(y, "out", bf16, quantize == 2);
  r.epilogue = to_epilogue(activation, quantize, scale, {});
  r.running_mean = to_ref(running_mean, "running_mean", bf16);
  r.running_var = to_ref(running_var, "running_var", bf16);
  r.weight = to_ref(weight, "weight", bf16);
  r.bias = to_ref(bias, "bias", bf16);
  r.mean = to_ref(mean, "mean", false);
  r.rstd = to_ref(rstd, "rstd", false);
  r.layout = to_layout(layout);
  return r;
}

// The C++ API calls its output `y`; the Python API calls it `out`. Errors about
// it are renamed on the way out so that the message names the Python argument.
template <class F>
inline void naming_out(F&& call) {
  try {
    call();
  } catch (const normkit::Error& e) {
    const std::string what = e.what();
    if (what.rfind("y: ", 0) == 0) throw normkit::Error(e.kind(), "out: " + what.substr(3));
    throw;
  }
}

// Releases the GIL around a kernel call, unless the call is so small that the
// release (a futex round trip) would cost more than the kernel itself.
class KernelGilRelease {
 public:
  explicit KernelGilRelease(std::int64_t elements) : state_(elements >= kMinElements ? PyEval_SaveThread() : nullptr) {}
  ~KernelGilRelease() {
    if (state_) PyEval_RestoreThread(state_);
  }
  KernelGilRelease(const KernelGilRelease&) = delete;
  KernelGilRelease& operator=(const KernelGilRelease&) = delete;

 private:
  static constexpr std::int64_t kMinElements = 16384;
  PyThreadState* state_;
};

}  // namespace normkit_python
