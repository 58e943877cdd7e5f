#include "runtime/cpu_features.hpp"

#include <utility>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define NORMKIT_X86_64 1
#endif

namespace normkit::runtime {

namespace {

#if defined(NORMKIT_X86_64)
unsigned long long read_xcr0() {
  unsigned int eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#if defined(NORMKIT_X86_64)
  f.x86_64 = true;
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool osxsave = (ecx >> 27) & 1;
  f.avx = (ecx >> 28) & 1;
  f.fma = (ecx >> 12) & 1;
  f.f16c = (ecx >> 29) & 1;
  if (osxsave) {
    const unsigned long long xcr0 = read_xcr0();
    f.os_ymm = (xcr0 & 0x6) == 0x6;     // XMM and YMM state
    f.os_zmm = (xcr0 & 0xe6) == 0xe6;   // plus opmask, ZMM_Hi256, Hi16_ZMM
  }
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) {
    f.avx2 = (ebx >> 5) & 1;
    f.avx512f = (ebx >> 16) & 1;
    f.avx512dq = (ebx >> 17) & 1;
    f.avx512bw = (ebx >> 30) & 1;
    f.avx512vl = (ebx >> 31) & 1;
    f.avx512_fp16 = (edx >> 23) & 1;
    f.amx_tile = (edx >> 24) & 1;
    const unsigned int max_subleaf = eax;
    if (max_subleaf >= 1 && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) f.avx512_bf16 = (eax >> 5) & 1;
  }
#endif
  return f;
}

}  // namespace

std::vector<std::string> CpuFeatures::names() const {
  std::vector<std::string> out;
  if (!x86_64) return out;
  const std::pair<bool, const char*> all[] = {
      {avx, "avx"},           {avx2, "avx2"},         {fma, "fma"},
      {f16c, "f16c"},         {avx512f, "avx512f"},   {avx512bw, "avx512bw"},
      {avx512vl, "avx512vl"}, {avx512dq, "avx512dq"}, {avx512_fp16, "avx512_fp16"},
      {avx512_bf16, "avx512_bf16"}, {amx_tile, "amx_tile"}, {os_ymm, "os_ymm"},
      {os_zmm, "os_zmm"},
  };
  for (const auto& [present, name] : all)
    if (present) out.emplace_back(name);
  return out;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

}  // namespace normkit::runtime
