// cuda/small_kernels.cu - per-channel helpers the entry points need between
// the main kernels (a few hundred to a few thousand values each).
#include "cuda/common.cuh"

namespace normkit::cuda_kernels {

namespace {

template <class A>
__global__ void stats_from_running_kernel(const A* running_mean, const A* running_var, A eps, A* mean_out,
                                          A* rstd_out, std::int64_t count) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < count;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const A m = running_mean[i];  // read both before writing (mean_out may be running_mean)
    const A v = running_var[i];
    mean_out[i] = m;
    rstd_out[i] = rsqrt_acc(v + eps);
  }
}

template <class A>
__global__ void reciprocal_kernel(const A* in, A* out, std::int64_t count) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < count;
       i += std::int64_t(gridDim.x) * blockDim.x)
    out[i] = A(1) / in[i];
}

constexpr int kThreads = 256;

}  // namespace

void stats_from_running(DType dtype, const void* running_mean, const void* running_var, double eps, void* mean_out,
                        void* rstd_out, std::int64_t count, Stream stream) {
  if (count <= 0) return;
  const unsigned blocks = grid_1d(count, kThreads, 4096);
  if (dtype == DType::float64)
    stats_from_running_kernel<double><<<blocks, kThreads, 0, as_cuda(stream)>>>(
        static_cast<const double*>(running_mean), static_cast<const double*>(running_var), eps,
        static_cast<double*>(mean_out), static_cast<double*>(rstd_out), count);
  else
    stats_from_running_kernel<float><<<blocks, kThreads, 0, as_cuda(stream)>>>(
        static_cast<const float*>(running_mean), static_cast<const float*>(running_var), static_cast<float>(eps),
        static_cast<float*>(mean_out), static_cast<float*>(rstd_out), count);
  check_launch("stats_from_running");
}

void reciprocal(DType dtype, const void* in, void* out, std::int64_t count, Stream stream) {
  if (count <= 0) return;
  const unsigned blocks = grid_1d(count, kThreads, 4096);
  if (dtype == DType::float64)
    reciprocal_kernel<double><<<blocks, kThreads, 0, as_cuda(stream)>>>(static_cast<const double*>(in),
                                                                          static_cast<double*>(out), count);
  else
    reciprocal_kernel<float><<<blocks, kThreads, 0, as_cuda(stream)>>>(static_cast<const float*>(in),
                                                                         static_cast<float*>(out), count);
  check_launch("reciprocal");
}

}  // namespace normkit::cuda_kernels
