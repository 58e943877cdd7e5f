// cuda/cuda_disabled.cpp - normkit::cuda in a build without the CUDA backend:
// the same functions, so that an engine's code links either way, each
// reporting that this build has no CUDA (normkit::cuda::built() is false).
#include "normkit/cuda.hpp"

namespace normkit::cuda {

namespace {
[[noreturn]] void no_cuda(const char* function) {
  throw Error(ErrorKind::runtime, std::string(function) +
                                      ": this normkit was built without CUDA (configure with -DNORMKIT_CUDA=ON, "
                                      "or pip install . -Ccmake.define.NORMKIT_CUDA=ON)");
}
}  // namespace

bool built() noexcept { return false; }
int device_count() noexcept { return 0; }

void layer_norm(const TensorRef&, const TensorRef&, const Dims&, const TensorRef&, const TensorRef&, double,
                const TensorRef&, const TensorRef&, cudaStream_t) {
  no_cuda("normkit::cuda::layer_norm");
}
void rms_norm(const TensorRef&, const TensorRef&, const Dims&, const TensorRef&, std::optional<double>,
              const TensorRef&, cudaStream_t) {
  no_cuda("normkit::cuda::rms_norm");
}
void batch_norm(const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&,
                const TensorRef&, bool, double, double, std::optional<Layout>, const TensorRef&, const TensorRef&,
                cudaStream_t) {
  no_cuda("normkit::cuda::batch_norm");
}
void instance_norm(const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&,
                   const TensorRef&, bool, double, double, std::optional<Layout>, const TensorRef&, const TensorRef&,
                   cudaStream_t) {
  no_cuda("normkit::cuda::instance_norm");
}
void group_norm(const TensorRef&, const TensorRef&, std::int64_t, const TensorRef&, const TensorRef&, double,
                std::optional<Layout>, const TensorRef&, const TensorRef&, cudaStream_t) {
  no_cuda("normkit::cuda::group_norm");
}
void adaptive_instance_norm(const TensorRef&, const TensorRef&, const TensorRef&, double, std::optional<Layout>,
                            cudaStream_t) {
  no_cuda("normkit::cuda::adaptive_instance_norm");
}
void adaptive_instance_norm(const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&, double,
                            std::optional<Layout>, cudaStream_t) {
  no_cuda("normkit::cuda::adaptive_instance_norm");
}
void layer_norm_backward(const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&, const Dims&,
                         const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&, cudaStream_t) {
  no_cuda("normkit::cuda::layer_norm_backward");
}
void rms_norm_backward(const TensorRef&, const TensorRef&, const TensorRef&, const Dims&, const TensorRef&,
                       const TensorRef&, const TensorRef&, cudaStream_t) {
  no_cuda("normkit::cuda::rms_norm_backward");
}
void batch_norm_backward(const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&,
                         const TensorRef&, const TensorRef&, const TensorRef&, bool, std::optional<Layout>,
                         cudaStream_t) {
  no_cuda("normkit::cuda::batch_norm_backward");
}
void instance_norm_backward(const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&,
                            const TensorRef&, const TensorRef&, const TensorRef&, bool, std::optional<Layout>,
                            cudaStream_t) {
  no_cuda("normkit::cuda::instance_norm_backward");
}
void group_norm_backward(const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&, std::int64_t,
                         const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&,
                         std::optional<Layout>, cudaStream_t) {
  no_cuda("normkit::cuda::group_norm_backward");
}
void adaptive_instance_norm_backward(const TensorRef&, const TensorRef&, const TensorRef&, double, const TensorRef&,
                                     const TensorRef&, std::optional<Layout>, cudaStream_t) {
  no_cuda("normkit::cuda::adaptive_instance_norm_backward");
}
void adaptive_instance_norm_backward(const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&, double,
                                     const TensorRef&, const TensorRef&, const TensorRef&, std::optional<Layout>,
                                     cudaStream_t) {
  no_cuda("normkit::cuda::adaptive_instance_norm_backward");
}

}  // namespace normkit::cuda
