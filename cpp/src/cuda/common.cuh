// cuda/common.cuh - device helpers shared by the CUDA kernels: element types
// and their accumulation type, 16-byte vector access, Welford moments merged
// by Chan's formula, deterministic warp / block reductions, dtype dispatch,
// error checks and stream-ordered scratch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/launch.hpp"
#include "normkit/error.hpp"

namespace normkit::cuda_kernels {

// ---- errors -------------------------------------------------------------------
inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw Error(ErrorKind::runtime, std::string("CUDA error in ") + what + ": " + cudaGetErrorName(status) + " (" +
                                        cudaGetErrorString(status) + ")");
}
// After a launch: a bad configuration is reported here, a fault later by the stream.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

inline cudaStream_t as_cuda(Stream s) { return static_cast<cudaStream_t>(s); }

// ---- stream-ordered scratch -----------------------------------------------------
// Device memory valid for work queued on `stream` until the object is destroyed
// (the free is queued on the same stream, after that work).
class Scratch {
 public:
  Scratch(std::size_t bytes, Stream stream) : stream_(as_cuda(stream)) {
    if (bytes) check_cuda(cudaMallocAsync(&ptr_, bytes, stream_), "cudaMallocAsync (scratch)");
  }
  ~Scratch() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

// ---- element types ------------------------------------------------------------
template <class T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <class T>
using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <class T>
__device__ __forceinline__ T from_acc(double v);
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }

// Calls f(T{}) with T the element type of `dtype`.
template <class F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::float32: return f(float{});
    case DType::float64: return f(double{});
    case DType::float16: return f(__half{});
    case DType::bfloat16: return f(__nv_bfloat16{});
  }
}

// ---- 16-byte vectors ----------------------------------------------------------
// kVec<T> elements of T in 16 bytes, loaded and stored as one transaction.
template <class T>
constexpr int kVec = static_cast<int>(16 / sizeof(T));

template <class T>
struct alignas(16) Vec {
  T v[kVec<T>];
};

// True when p is 16-byte aligned.
__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0;
}

// ---- moments --------------------------------------------------------------------
// Welford state: count, mean, sum of squared deviations.
template <class A>
struct Moments {
  A count, mean, m2;
};

template <class A>
__device__ __forceinline__ void welford_add(Moments<A>& m, A x) {
  m.count += A(1);
  const A d = x - m.mean;
  m.mean += d / m.count;
  m.m2 += d * (x - m.mean);
}

// Chan's parallel merge of two partial moments (either may be empty).
template <class A>
__device__ __forceinline__ Moments<A> chan_merge(const Moments<A>& a, const Moments<A>& b) {
  if (b.count == A(0)) return a;
  if (a.count == A(0)) return b;
  const A n = a.count + b.count;
  const A wb = b.count / n;
  const A d = b.mean - a.mean;
  Moments<A> r;
  r.count = n;
  r.mean = a.mean + d * wb;
  r.m2 = a.m2 + b.m2 + d * d * a.count * wb;
  return r;
}

// Butterfly reductions over a warp, the tree fixed by the lane numbers (so the
// result does not depend on timing). warp_sum leaves the same value in every
// lane; warp_merge's lanes may differ in the last bits (Chan's merge is not
// symmetric in its two inputs): use lane 0's result.
template <class A>
__device__ __forceinline__ Moments<A> warp_merge(Moments<A> m) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Moments<A> o;
    o.count = __shfl_xor_sync(0xffffffffu, m.count, offset);
    o.mean = __shfl_xor_sync(0xffffffffu, m.mean, offset);
    o.m2 = __shfl_xor_sync(0xffffffffu, m.m2, offset);
    m = chan_merge(m, o);
  }
  return m;
}

template <class A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Block-wide merge (blockDim.x a multiple of 32, at most 1024): warps merge,
// then warp 0 merges the warps' results in warp order. Every thread returns the
// block's result. `shared` holds 32 entries.
template <class A>
__device__ Moments<A> block_merge(Moments<A> m, Moments<A>* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  m = warp_merge(m);
  __syncthreads();  // `shared` may still be read from a previous call
  if (lane == 0) shared[warp] = m;
  __syncthreads();
  if (warp == 0) {
    Moments<A> w = lane < warps ? shared[lane] : Moments<A>{A(0), A(0), A(0)};
    w = warp_merge(w);
    if (lane == 0) shared[0] = w;
  }
  __syncthreads();
  return shared[0];
}

// Block-wide sum of K values per thread (same rules as block_merge); `shared`
// holds 32 * K entries.
template <int K, class A>
__device__ void block_sum(A (&v)[K], A* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  __syncthreads();
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < K; ++k) shared[k * 32 + warp] = v[k];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      A w = lane < warps ? shared[k * 32 + lane] : A(0);
      w = warp_sum(w);
      if (lane == 0) shared[k * 32] = w;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = shared[k * 32];
}

// 1 / sqrt(v) in the accumulation type (correctly rounded, not the fast approximation).
__device__ __forceinline__ float rsqrt_acc(float v) { return 1.0f / sqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return 1.0 / sqrt(v); }

inline unsigned grid_1d(std::int64_t units, int per_block, std::int64_t max_blocks = 65535LL * 32) {
  std::int64_t b = (units + per_block - 1) / per_block;
  if (b < 1) b = 1;
  if (b > max_blocks) b = max_blocks;
  return static_cast<unsigned>(b);
}

}  // namespace normkit::cuda_kernels
