// output_cache.hpp - reuse of large output buffers between Python calls.
//
// A fresh NumPy output over ~32 MiB comes from mmap: the kernel zeroes every
// page on first touch, which costs about as much as the norm itself. When an
// output allocated here dies, its buffer goes back to a free list (keyed by
// size) instead of to the OS, and the next call of the same size reuses pages
// that are already mapped (ONNX Runtime's arena does the same). The cache
// holds at most `limit` bytes of free buffers; normkit.set_output_cache_limit
// changes it (0 turns caching off).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <map>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace normkit_python {

class OutputCache {
 public:
  // Buffers start on a 2 MiB boundary: whole huge pages, and an output at the
  // start of a page is never a few bytes above its input modulo 4 KiB (the
  // input's own offset, 16 or 64 bytes for large NumPy or PyTorch arrays, or 0
  // for an output of this cache fed to the next norm): streamed stores just
  // above the loads of the same row made LayerNorm [8192,768] float32 2.1x
  // slower on an Ice Lake Xeon, with posix_memalign's 64 bytes past a page.
  static constexpr std::size_t kAlignment = std::size_t(2) << 20;

  // Never destroyed: arrays may outlive static destruction at exit.
  static OutputCache& instance() {
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

  // A kAlignment-aligned buffer of `bytes`; release() takes it back.
  void* acquire(std::size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* p = it->second;
        free_.erase(it);
        cached_ -= bytes;
        return p;
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, kAlignment, bytes == 0 ? 1 : bytes) != 0) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE);  // fewer faults and TLB misses, as NumPy does; a hint only
#endif
    return p;
  }

  void release(void* p, std::size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + bytes <= limit_) {
        free_.emplace(bytes, p);
        cached_ += bytes;
        return;
      }
    }
    std::free(p);
  }

  void set_limit(std::size_t bytes) {
    std::multimap<std::size_t, void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = bytes;
      while (cached_ > limit_ && !free_.empty()) {
        auto it = std::prev(free_.end());  // drop the largest first
        cached_ -= it->first;
        evicted.insert(*it);
        free_.erase(it);
      }
    }
    for (auto& entry : evicted) std::free(entry.second);
  }

  std::size_t limit() {
    std::lock_guard<std::mutex> lock(mutex_);
    return limit_;
  }
  std::size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

 private:
  OutputCache() = default;
  std::mutex mutex_;
  std::multimap<std::size_t, void*> free_;
  std::size_t cached_ = 0;
  std::size_t limit_ = std::size_t(512) << 20;
};

}  // namespace normkit_python
