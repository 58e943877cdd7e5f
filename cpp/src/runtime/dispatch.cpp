#include "runtime/dispatch.hpp"

#include <atomic>
#include <cstdlib>

#include "core/check.hpp"
#include "normkit/runtime.hpp"
#include "runtime/cpu_features.hpp"

namespace normkit::runtime {

namespace {

struct PathEntry {
  const kernels::IsaKernels* table;
  bool (*supported)();
};

bool always() { return true; }
[[maybe_unused]] bool avx2_ok() { return cpu_features().can_run_avx2(); }
[[maybe_unused]] bool avx512_ok() { return cpu_features().can_run_avx512(); }
[[maybe_unused]] bool avx512_bf16_ok() { return cpu_features().can_run_avx512_bf16(); }

// Compiled paths, from the portable one up to the widest.
const PathEntry kPaths[] = {
    {&kernels::scalar::kTable, &always},
#if defined(NORMKIT_HAVE_AVX2_KERNELS)
    {&kernels::avx2::kTable, &avx2_ok},
#endif
#if defined(NORMKIT_HAVE_AVX512_KERNELS)
    {&kernels::avx512::kTable, &avx512_ok},
#endif
#if defined(NORMKIT_HAVE_AVX512_BF16_KERNELS)
    {&kernels::avx512_bf16::kTable, &avx512_bf16_ok},
#endif
};

const PathEntry* find_path(const std::string& name) {
  for (const auto& entry : kPaths)
    if (name == entry.table->name) return &entry;
  return nullptr;
}

const kernels::IsaKernels* checked_table(const std::string& name, const char* source) {
  const PathEntry* entry = find_path(name);
  if (entry == nullptr) {
    std::string known;
    for (const auto& e : kPaths) known += std::string(known.empty() ? "" : ", ") + e.table->name;
    const bool known_name = name == "scalar" || name == "avx2" || name == "avx512" || name == "avx512_bf16";
    core::fail_value(std::string(source) + ": kernel path '" + name + "' " +
                     (known_name ? "was not compiled into this build" : "is unknown") +
                     " (this build has: " + known + ")");
  }
  if (!entry->supported())
    core::fail_value(std::string(source) + ": kernel path '" + name +
                     "' needs instructions this CPU (or its OS) does not support; supported here: " +
                     [] {
                       std::string s;
                       for (const auto& p : supported_kernel_paths()) s += (s.empty() ? "" : ", ") + p;
                       return s;
                     }());
  return entry->table;
}

const kernels::IsaKernels* best_table() {
  const kernels::IsaKernels* best = kPaths[0].table;
  for (const auto& entry : kPaths)
    if (entry.supported()) best = entry.table;
  return best;
}

std::atomic<const kernels::IsaKernels*> g_active{nullptr};

}  // namespace

const kernels::IsaKernels& active_kernels() {
  const kernels::IsaKernels* table = g_active.load(std::memory_order_acquire);
  if (table != nullptr) return *table;
  const char* forced = std::getenv("NORMKIT_ISA");
  table = (forced != nullptr && *forced != '\0') ? checked_table(forced, "NORMKIT_ISA") : best_table();
  const kernels::IsaKernels* expected = nullptr;
  // If another thread won the race (or set_kernel_path ran), keep its choice.
  if (!g_active.compare_exchange_strong(expected, table, std::memory_order_acq_rel)) return *expected;
  return *table;
}

std::vector<std::string> compiled_kernel_paths() {
  std::vector<std::string> out;
  for (const auto& entry : kPaths) out.emplace_back(entry.table->name);
  return out;
}

std::vector<std::string> supported_kernel_paths() {
  std::vector<std::string> out;
  for (const auto& entry : kPaths)
    if (entry.supported()) out.emplace_back(entry.table->name);
  return out;
}

}  // namespace normkit::runtime

namespace normkit {

std::string kernel_path() { return runtime::active_kernels().name; }

void set_kernel_path(const std::string& name) {
  runtime::g_active.store(runtime::checked_table(name, "name"), std::memory_order_release);
}

}  // namespace normkit
