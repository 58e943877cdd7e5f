// test_allocations.cpp - what a call allocates, counted by replacing the global
// operator new for this test program.
//
// The documented rule (normkit/norms.hpp): no allocation in a forward call beyond
// small scratch. LayerNorm and RMSNorm on float32/float64 allocate nothing; 16-bit
// inputs with 16-bit weights widen the weights once (a vector of `cols` floats);
// the channel norms allocate O(N*C) statistics tables, never anything the size of x.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

#include "normkit/normkit.hpp"

namespace {
std::atomic<bool> counting{false};
std::atomic<long> allocations{0};
std::atomic<long> allocated_bytes{0};
std::atomic<long> largest{0};

void note(std::size_t n) {
  if (!counting.load(std::memory_order_relaxed)) return;
  allocations.fetch_add(1, std::memory_order_relaxed);
  allocated_bytes.fetch_add(static_cast<long>(n), std::memory_order_relaxed);
  long prev = largest.load(std::memory_order_relaxed);
  while (static_cast<long>(n) > prev && !largest.compare_exchange_weak(prev, static_cast<long>(n))) {
  }
}
}  // namespace

// GCC cannot see that these operator new / delete pairs are malloc / free on
// both sides and warns that free() gets memory from operator new.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

void* operator new(std::size_t n) {
  note(n);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace nk = normkit;

namespace {

struct Count {
  long calls, bytes, largest;
};

template <class F>
Count count_allocations(F&& call) {
  call();  // first call: lazy one-time set-up (kernel choice, OpenMP team) is not counted
  allocations = 0;
  allocated_bytes = 0;
  largest = 0;
  counting = true;
  call();
  counting = false;
  return {allocations.load(), allocated_bytes.load(), largest.load()};
}

class Allocations : public ::testing::TestWithParam<int> {  // thread count
 protected:
  void SetUp() override {
    before_ = nk::get_num_threads();
    nk::set_num_threads(GetParam());
  }
  void TearDown() override { nk::set_num_threads(before_); }
  int before_ = 1;
};

TEST_P(Allocations, RowsNormsAllocateNothing) {
  const std::int64_t rows = 512, cols = 1024;
  std::vector<float> x(rows * cols, 1.5f), y(x.size()), w(cols, 1.0f), b(cols, 0.0f), mean(rows), rstd(rows);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 17);
  const nk::Dims shape{rows, cols};
  nk::TensorView<const float> xv(x.data(), shape), wv(w.data(), {cols}), bv(b.data(), {cols});
  nk::TensorView<float> yv(y.data(), shape), mv(mean.data(), {rows}), rv(rstd.data(), {rows});
  const Count ln = count_allocations([&] { nk::layer_norm(xv, yv, {cols}, wv, bv, 1e-5, mv, rv); });
  EXPECT_EQ(ln.calls, 0) << "layer_norm allocated " << ln.bytes << " bytes";
  const Count rms = count_allocations([&] { nk::rms_norm(xv, yv, {cols}, wv, 1e-6, rv); });
  EXPECT_EQ(rms.calls, 0) << "rms_norm allocated " << rms.bytes << " bytes";
  std::vector<double> xd(x.begin(), x.end()), yd(x.size());
  const Count ln64 = count_allocations([&] {
    nk::layer_norm(nk::TensorView<const double>(xd.data(), shape), nk::TensorView<double>(yd.data(), shape), {cols});
  });
  EXPECT_EQ(ln64.calls, 0);
}

TEST_P(Allocations, SixteenBitWeightsAreWidenedOnce) {
  const std::int64_t rows = 256, cols = 768;
  std::vector<nk::half> x(rows * cols, nk::half(0.5f)), y(x.size()), w(cols, nk::half(1.0f));
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = nk::half(static_cast<float>(i % 13));
  const nk::Dims shape{rows, cols};
  const Count c = count_allocations([&] {
    nk::layer_norm(nk::TensorView<const nk::half>(x.data(), shape), nk::TensorView<nk::half>(y.data(), shape), {cols},
                   nk::TensorView<const nk::half>(w.data(), {cols}));
  });
  EXPECT_LE(c.calls, 1);
  EXPECT_LE(c.largest, static_cast<long>(cols * sizeof(float)));
}

// Channel norms: statistics tables of O(N*C) doubles, never anything of x's size.
TEST_P(Allocations, ChannelNormsAllocateOnlyStatisticsTables) {
  const std::int64_t n = 8, c = 32, s = 4096;  // x: 4 MiB of float32
  std::vector<float> x(n * c * s), y(x.size()), dy(x.size()), dx(x.size()), w(c, 1.0f), b(c, 0.0f);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 23) * 0.25f, dy[i] = static_cast<float>(i % 7);
  std::vector<float> rm(c, 0.0f), rv(c, 1.0f), mean(n * c), rstd(n * c), dw(c), db(c);
  const long table_budget = 64 * static_cast<long>(n * c) * static_cast<long>(sizeof(double)) + 64 * 1024;
  for (nk::Layout layout : {nk::Layout::NCL, nk::Layout::NLC}) {
    const nk::Dims shape = layout == nk::Layout::NLC ? nk::Dims{n, s, c} : nk::Dims{n, c, s};
    nk::TensorView<const float> xv(x.data(), shape), dyv(dy.data(), shape), wv(w.data(), {c}), bv(b.data(), {c});
    nk::TensorView<float> yv(y.data(), shape), dxv(dx.data(), shape);
    nk::TensorView<float> rmv(rm.data(), {c}), rvv(rv.data(), {c});
    const Count counts[] = {
        count_allocations([&] { nk::batch_norm(xv, yv, rmv, rvv, wv, bv, true, 0.1, 1e-5, layout); }),
        count_allocations([&] { nk::batch_norm(xv, yv, rmv, rvv, wv, bv, false, 0.1, 1e-5, layout); }),
        count_allocations([&] {
          nk::group_norm(xv, yv, 4, wv, bv, 1e-5, layout, nk::TensorView<float>(mean.data(), {n, 4}),
                         nk::TensorView<float>(rstd.data(), {n, 4}));
        }),
        count_allocations([&] {
          nk::instance_norm(xv, yv, {}, {}, wv, bv, true, 0.1, 1e-5, layout, nk::TensorView<float>(mean.data(), {n, c}),
                            nk::TensorView<float>(rstd.data(), {n, c}));
        }),
        count_allocations([&] {
          nk::instance_norm_backward(dyv, xv, nk::TensorView<const float>(mean.data(), {n, c}),
                                     nk::TensorView<const float>(rstd.data(), {n, c}), wv, dxv,
                                     nk::TensorView<float>(dw.data(), {c}), nk::TensorView<float>(db.data(), {c}), true,
                                     layout);
        }),
    };
    // The hook sees the tables (else every check here would pass blindly).
    EXPECT_GT(counts[0].calls, 0) << "operator new replacement not in effect";
    for (const Count& k : counts) {
      EXPECT_LT(k.largest, table_budget) << nk::to_string(layout);
      EXPECT_LT(k.bytes, 8 * table_budget) << nk::to_string(layout);
      EXPECT_LT(k.largest, static_cast<long>(x.size() * sizeof(float)) / 8) << "an allocation near x's size";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Threads, Allocations, ::testing::Values(1, 2),
                         [](const auto& info) { return "threads" + std::to_string(info.param); });

}  // namespace
