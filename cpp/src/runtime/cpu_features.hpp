// runtime/cpu_features.hpp - what the CPU and the OS let normkit use.
#pragma once

#include <string>
#include <vector>

namespace normkit::runtime {

struct CpuFeatures {
  bool x86_64 = false;
  bool avx = false, avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_fp16 = false, avx512_bf16 = false, amx_tile = false;
  // XGETBV: has the OS enabled saving of YMM (AVX) and opmask/ZMM (AVX-512) state?
  bool os_ymm = false, os_zmm = false;

  bool can_run_avx2() const { return avx2 && fma && f16c && os_ymm; }
  bool can_run_avx512() const { return can_run_avx2() && avx512f && avx512bw && avx512vl && os_zmm; }
  bool can_run_avx512_bf16() const { return can_run_avx512() && avx512dq && avx512_bf16; }
  std::vector<std::string> names() const;
};

// Detected once, on first call.
const CpuFeatures& cpu_features();

}  // namespace normkit::runtime
