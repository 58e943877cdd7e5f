// normkit/cuda.hpp - the norms on NVIDIA GPUs (optional CUDA backend).
//
// The same functions, arguments and semantics as normkit/norms.hpp, in
// namespace normkit::cuda, with every view over DEVICE memory and a trailing
// CUDA stream. Work is queued on `stream` (nullptr: the legacy default stream)
// and the call returns without waiting for it; outputs are ready once the
// stream has reached that point. Scratch memory comes from the stream-ordered
// allocator (cudaMallocAsync) on the same stream.
//
// Rules on top of norms.hpp:
// - Every given view must be device (or managed) memory of one device, the
//   device x lives on; the call runs on that device. Host memory, or memory of
//   another device, is an Error naming the argument (ErrorKind::value).
// - Element types: float32, float64, float16, bfloat16 (float32 statistics and
//   accumulation for the 16-bit types), as on the CPU.
// - Rows norms accept the same strided x/y as on the CPU; channel norms need
//   contiguous arrays in their layout, as on the CPU.
// - Reductions use blocks fixed by the shape, merged in a fixed order: the
//   results are the same from run to run (no float atomics).
// - A build without CUDA (normkit::cuda::built() == false) still has these
//   functions; they throw Error (ErrorKind::runtime) saying so. So does a
//   machine without a CUDA device or driver.
// This header needs no CUDA headers; it declares cudaStream_t as CUDA does.
#pragma once

#include <optional>

#include "normkit/norms.hpp"

typedef struct CUstream_st* cudaStream_t;  // as in CUDA's driver_types.h

namespace normkit::cuda {

// True when this normkit was built with the CUDA backend (-DNORMKIT_CUDA=ON).
bool built() noexcept;
// Number of CUDA devices usable now (0 without CUDA, a driver or a device).
int device_count() noexcept;

void layer_norm(const TensorRef& x, const TensorRef& y, const Dims& normalized_shape, const TensorRef& weight = {},
                const TensorRef& bias = {}, double eps = 1e-5, const TensorRef& mean = {},
                const TensorRef& rstd = {}, cudaStream_t stream = nullptr);

void rms_norm(const TensorRef& x, const TensorRef& y, const Dims& normalized_shape, const TensorRef& weight = {},
              std::optional<double> eps = std::nullopt, const TensorRef& rstd = {}, cudaStream_t stream = nullptr);

void batch_norm(const TensorRef& x, const TensorRef& y, const TensorRef& running_mean, const TensorRef& running_var,
                const TensorRef& weight = {}, const TensorRef& bias = {}, bool training = false,
                double momentum = 0.1, double eps = 1e-5, std::optional<Layout> layout = std::nullopt,
                const TensorRef& mean = {}, const TensorRef& rstd = {}, cudaStream_t stream = nullptr);

void instance_norm(const TensorRef& x, const TensorRef& y, const TensorRef& running_mean = {},
                   const TensorRef& running_var = {}, const TensorRef& weight = {}, const TensorRef& bias = {},
                   bool use_input_stats = true, double momentum = 0.1, double eps = 1e-5,
                   std::optional<Layout> layout = std::nullopt, const TensorRef& mean = {},
                   const TensorRef& rstd = {}, cudaStream_t stream = nullptr);

void group_norm(const TensorRef& x, const TensorRef& y, std::int64_t num_groups, const TensorRef& weight = {},
                const TensorRef& bias = {}, double eps = 1e-5, std::optional<Layout> layout = std::nullopt,
                const TensorRef& mean = {}, const TensorRef& rstd = {}, cudaStream_t stream = nullptr);

void adaptive_instance_norm(const TensorRef& x, const TensorRef& y, const TensorRef& style, double eps = 1e-5,
                            std::optional<Layout> layout = std::nullopt, cudaStream_t stream = nullptr);
void adaptive_instance_norm(const TensorRef& x, const TensorRef& y, const TensorRef& style_mean,
                            const TensorRef& style_std, double eps = 1e-5,
                            std::optional<Layout> layout = std::nullopt, cudaStream_t stream = nullptr);

void layer_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& mean, const TensorRef& rstd,
                         const Dims& normalized_shape, const TensorRef& weight, const TensorRef& dx,
                         const TensorRef& dweight = {}, const TensorRef& dbias = {}, cudaStream_t stream = nullptr);

void rms_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& rstd, const Dims& normalized_shape,
                       const TensorRef& weight, const TensorRef& dx, const TensorRef& dweight = {},
                       cudaStream_t stream = nullptr);

void batch_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& mean, const TensorRef& rstd,
                         const TensorRef& weight, const TensorRef& dx, const TensorRef& dweight = {},
                         const TensorRef& dbias = {}, bool training = true,
                         std::optional<Layout> layout = std::nullopt, cudaStream_t stream = nullptr);

void instance_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& mean, const TensorRef& rstd,
                            const TensorRef& weight, const TensorRef& dx, const TensorRef& dweight = {},
                            const TensorRef& dbias = {}, bool use_input_stats = true,
                            std::optional<Layout> layout = std::nullopt, cudaStream_t stream = nullptr);

void group_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& mean, const TensorRef& rstd,
                         std::int64_t num_groups, const TensorRef& weight, const TensorRef& dx,
                         const TensorRef& dweight = {}, const TensorRef& dbias = {},
                         std::optional<Layout> layout = std::nullopt, cudaStream_t stream = nullptr);

void adaptive_instance_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& style, double eps,
                                     const TensorRef& dx, const TensorRef& dstyle = {},
                                     std::optional<Layout> layout = std::nullopt, cudaStream_t stream = nullptr);
void adaptive_instance_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& style_mean,
                                     const TensorRef& style_std, double eps, const TensorRef& dx,
                                     const TensorRef& dstyle_mean = {}, const TensorRef& dstyle_std = {},
                                     std::optional<Layout> layout = std::nullopt, cudaStream_t stream = nullptr);

}  // namespace normkit::cuda
