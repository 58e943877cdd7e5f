// test_threads.cpp - normkit called from several threads at once, with OpenMP
// running inside each call.
//
// An engine runs normkit from its own worker threads (normkit/runtime.hpp: "calls
// from several threads at once are safe"). Here kWorkers std::threads each call
// every norm - layer_norm, rms_norm, batch_norm (training and eval),
// instance_norm, group_norm, adaptive_instance_norm (both style forms), every
// *_backward, and the five layer objects (one set per thread) - repeatedly on
// their own data, with set_num_threads(2) so each call also forks an OpenMP team,
// and every result must be bit for bit the result of the same calls made
// serially (one thread, no OpenMP) before the workers start. In a second phase
// another thread keeps changing the thread count (set_num_threads), re-sets the
// kernel path and reads runtime_info() while the workers run.
//
// Built as its own program (normkit_thread_tests) so the ThreadSanitizer build
// (scripts/sanitizers.sh) can build just it; in a normal build it is one ctest
// entry (cpp.threads). The first test must stay first: it makes the first normkit
// calls of the process from several threads at once (lazy kernel-path choice and
// thread-count default).
//
// NORMKIT_THREAD_TEST_ITERS (default 3) sets how many times each worker repeats
// the whole set of calls per phase.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "normkit/normkit.hpp"

namespace nk = normkit;
using std::int64_t;

namespace {

constexpr int kWorkers = 4;

// Sizes: every call moves at least 2 * 128 KiB (runtime/threads.hpp:
// kMinBytesPerThread), so with set_num_threads(2) each call runs an OpenMP team.
constexpr int64_t kRows = 256, kCols = 768;                  // rows norms: 768 KiB of float32
constexpr int64_t kN = 8, kC = 16, kH = 32, kW = 48;         // channel norms: 768 KiB of float32
constexpr int64_t kGroups = 4;
constexpr int64_t kStyleH = 16, kStyleW = 24;                // AdaIN style: another spatial size

int iterations() {
  const char* env = std::getenv("NORMKIT_THREAD_TEST_ITERS");
  const int n = env != nullptr ? std::atoi(env) : 0;
  return n > 0 ? n : 3;
}

std::vector<float> random_floats(int64_t n, unsigned seed, float mean = 0.0f, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(mean, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& e : v) e = dist(gen);
  return v;
}

// One thread's inputs (its own copies) and named outputs.
struct Inputs {
  std::vector<float> x_rows, dy_rows, w_rows, b_rows;
  std::vector<nk::half> x_rows_half, w_rows_half;
  std::vector<float> x_img, dy_img, w_c, b_c, rm0, rv0, style, style_mean, style_std;

  Inputs() {
    x_rows = random_floats(kRows * kCols, 1, 0.5f, 2.0f);
    dy_rows = random_floats(kRows * kCols, 2);
    w_rows = random_floats(kCols, 3, 1.0f, 0.2f);
    b_rows = random_floats(kCols, 4, 0.0f, 0.2f);
    for (float v : x_rows) x_rows_half.emplace_back(v);
    for (float v : w_rows) w_rows_half.emplace_back(v);
    x_img = random_floats(kN * kC * kH * kW, 5, -1.0f, 3.0f);
    dy_img = random_floats(kN * kC * kH * kW, 6);
    w_c = random_floats(kC, 7, 1.0f, 0.2f);
    b_c = random_floats(kC, 8, 0.0f, 0.2f);
    rm0 = random_floats(kC, 9, 0.0f, 0.1f);
    rv0 = random_floats(kC, 10, 1.0f, 0.1f);
    for (auto& v : rv0) v = std::max(v, 0.5f);
    style = random_floats(kN * kC * kStyleH * kStyleW, 11, 2.0f, 0.5f);
    style_mean = random_floats(kN * kC, 12);
    style_std = random_floats(kN * kC, 13, 1.0f, 0.1f);
  }
};

// Outputs by name; buffers are created on first use and reused after that.
class Outputs {
 public:
  std::vector<float>& get(const std::string& name, int64_t n, float fill = 0.0f) {
    auto& v = buffers_[name];
    v.assign(static_cast<size_t>(n), fill);
    return v;
  }
  const std::map<std::string, std::vector<float>>& all() const { return buffers_; }

 private:
  std::map<std::string, std::vector<float>> buffers_;
};

using CView = nk::TensorView<const float>;
using MView = nk::TensorView<float>;

// Every norm, forward and backward, and every layer object, on `in`, into `out`.
void run_every_norm(const Inputs& in, Outputs& out) {
  const nk::Dims rows_shape{kRows, kCols}, cols_shape{kCols};
  const nk::Dims nchw{kN, kC, kH, kW}, nhwc{kN, kH, kW, kC}, c_shape{kC}, nc{kN, kC}, ng{kN, kGroups};
  const nk::Dims style_nchw{kN, kC, kStyleH, kStyleW};
  const int64_t rows_n = kRows * kCols, img_n = kN * kC * kH * kW;
  const CView x_rows(in.x_rows.data(), rows_shape), dy_rows(in.dy_rows.data(), rows_shape);
  const CView w_rows(in.w_rows.data(), cols_shape), b_rows(in.b_rows.data(), cols_shape);
  const CView w_c(in.w_c.data(), c_shape), b_c(in.b_c.data(), c_shape);

  // --- LayerNorm, forward and backward
  {
    auto& y = out.get("layer_norm.y", rows_n);
    auto& mean = out.get("layer_norm.mean", kRows);
    auto& rstd = out.get("layer_norm.rstd", kRows);
    nk::layer_norm(x_rows, MView(y.data(), rows_shape), {kCols}, w_rows, b_rows, 1e-5, MView(mean.data(), {kRows}),
                   MView(rstd.data(), {kRows}));
    auto& dx = out.get("layer_norm_backward.dx", rows_n);
    auto& dw = out.get("layer_norm_backward.dw", kCols);
    auto& db = out.get("layer_norm_backward.db", kCols);
    nk::layer_norm_backward(dy_rows, x_rows, CView(mean.data(), {kRows}), CView(rstd.data(), {kRows}), {kCols},
                            w_rows, MView(dx.data(), rows_shape), MView(dw.data(), cols_shape),
                            MView(db.data(), cols_shape));
  }
  // --- LayerNorm on float16 with float16 weights (widens the weights per call)
  {
    std::vector<nk::half> y16(static_cast<size_t>(rows_n));
    nk::layer_norm(nk::TensorView<const nk::half>(in.x_rows_half.data(), rows_shape),
                   nk::TensorView<nk::half>(y16.data(), rows_shape), {kCols},
                   nk::TensorView<const nk::half>(in.w_rows_half.data(), cols_shape));
    auto& y = out.get("layer_norm.float16.y", rows_n);
    for (int64_t i = 0; i < rows_n; ++i) y[i] = static_cast<float>(y16[i]);
  }
  // --- RMSNorm, forward and backward
  {
    auto& y = out.get("rms_norm.y", rows_n);
    auto& rstd = out.get("rms_norm.rstd", kRows);
    nk::rms_norm(x_rows, MView(y.data(), rows_shape), {kCols}, w_rows, std::nullopt, MView(rstd.data(), {kRows}));
    auto& dx = out.get("rms_norm_backward.dx", rows_n);
    auto& dw = out.get("rms_norm_backward.dw", kCols);
    nk::rms_norm_backward(dy_rows, x_rows, CView(rstd.data(), {kRows}), {kCols}, w_rows,
                          MView(dx.data(), rows_shape), MView(dw.data(), cols_shape));
  }
  // --- BatchNorm, training (NCHW, running statistics updated), forward and backward
  {
    const CView x(in.x_img.data(), nchw), dy(in.dy_img.data(), nchw);
    auto& y = out.get("batch_norm.train.y", img_n);
    auto& rm = out.get("batch_norm.train.running_mean", kC);
    auto& rv = out.get("batch_norm.train.running_var", kC);
    rm = in.rm0;
    rv = in.rv0;
    auto& mean = out.get("batch_norm.train.mean", kC);
    auto& rstd = out.get("batch_norm.train.rstd", kC);
    nk::batch_norm(x, MView(y.data(), nchw), MView(rm.data(), c_shape), MView(rv.data(), c_shape), w_c, b_c, true,
                   0.1, 1e-5, nk::Layout::NCHW, MView(mean.data(), c_shape), MView(rstd.data(), c_shape));
    auto& dx = out.get("batch_norm_backward.train.dx", img_n);
    auto& dw = out.get("batch_norm_backward.train.dw", kC);
    auto& db = out.get("batch_norm_backward.train.db", kC);
    nk::batch_norm_backward(dy, x, CView(mean.data(), c_shape), CView(rstd.data(), c_shape), w_c,
                            MView(dx.data(), nchw), MView(dw.data(), c_shape), MView(db.data(), c_shape), true,
                            nk::Layout::NCHW);
  }
  // --- BatchNorm, eval (NHWC, running statistics), forward and backward
  {
    const CView x(in.x_img.data(), nhwc), dy(in.dy_img.data(), nhwc);
    auto& y = out.get("batch_norm.eval.y", img_n);
    auto& mean = out.get("batch_norm.eval.mean", kC);
    auto& rstd = out.get("batch_norm.eval.rstd", kC);
    nk::batch_norm(x, MView(y.data(), nhwc), CView(in.rm0.data(), c_shape), CView(in.rv0.data(), c_shape), w_c, b_c,
                   false, 0.1, 1e-5, nk::Layout::NHWC, MView(mean.data(), c_shape), MView(rstd.data(), c_shape));
    auto& dx = out.get("batch_norm_backward.eval.dx", img_n);
    auto& dw = out.get("batch_norm_backward.eval.dw", kC);
    auto& db = out.get("batch_norm_backward.eval.db", kC);
    nk::batch_norm_backward(dy, x, CView(mean.data(), c_shape), CView(rstd.data(), c_shape), w_c,
                            MView(dx.data(), nhwc), MView(dw.data(), c_shape), MView(db.data(), c_shape), false,
                            nk::Layout::NHWC);
  }
  // --- InstanceNorm (NCHW, input statistics, running statistics updated), forward and backward
  {
    const CView x(in.x_img.data(), nchw), dy(in.dy_img.data(), nchw);
    auto& y = out.get("instance_norm.y", img_n);
    auto& rm = out.get("instance_norm.running_mean", kC);
    auto& rv = out.get("instance_norm.running_var", kC);
    rm = in.rm0;
    rv = in.rv0;
    auto& mean = out.get("instance_norm.mean", kN * kC);
    auto& rstd = out.get("instance_norm.rstd", kN * kC);
    nk::instance_norm(x, MView(y.data(), nchw), MView(rm.data(), c_shape), MView(rv.data(), c_shape), w_c, b_c, true,
                      0.1, 1e-5, nk::Layout::NCHW, MView(mean.data(), nc), MView(rstd.data(), nc));
    auto& dx = out.get("instance_norm_backward.dx", img_n);
    auto& dw = out.get("instance_norm_backward.dw", kC);
    auto& db = out.get("instance_norm_backward.db", kC);
    nk::instance_norm_backward(dy, x, CView(mean.data(), nc), CView(rstd.data(), nc), w_c, MView(dx.data(), nchw),
                               MView(dw.data(), c_shape), MView(db.data(), c_shape), true, nk::Layout::NCHW);
  }
  // --- GroupNorm (NHWC), forward and backward
  {
    const CView x(in.x_img.data(), nhwc), dy(in.dy_img.data(), nhwc);
    auto& y = out.get("group_norm.y", img_n);
    auto& mean = out.get("group_norm.mean", kN * kGroups);
    auto& rstd = out.get("group_norm.rstd", kN * kGroups);
    nk::group_norm(x, MView(y.data(), nhwc), kGroups, w_c, b_c, 1e-5, nk::Layout::NHWC, MView(mean.data(), ng),
                   MView(rstd.data(), ng));
    auto& dx = out.get("group_norm_backward.dx", img_n);
    auto& dw = out.get("group_norm_backward.dw", kC);
    auto& db = out.get("group_norm_backward.db", kC);
    nk::group_norm_backward(dy, x, CView(mean.data(), ng), CView(rstd.data(), ng), kGroups, w_c,
                            MView(dx.data(), nhwc), MView(dw.data(), c_shape), MView(db.data(), c_shape),
                            nk::Layout::NHWC);
  }
  // --- AdaIN from a style feature map (NCHW), forward and backward
  {
    const CView x(in.x_img.data(), nchw), dy(in.dy_img.data(), nchw), style(in.style.data(), style_nchw);
    auto& y = out.get("adaptive_instance_norm.map.y", img_n);
    nk::adaptive_instance_norm(x, MView(y.data(), nchw), style, 1e-5, nk::Layout::NCHW);
    auto& dx = out.get("adaptive_instance_norm_backward.map.dx", img_n);
    auto& dstyle = out.get("adaptive_instance_norm_backward.map.dstyle", kN * kC * kStyleH * kStyleW);
    nk::adaptive_instance_norm_backward(dy, x, style, 1e-5, MView(dx.data(), nchw),
                                        MView(dstyle.data(), style_nchw), nk::Layout::NCHW);
  }
  // --- AdaIN from given statistics (NHWC), forward and backward
  {
    const CView x(in.x_img.data(), nhwc), dy(in.dy_img.data(), nhwc);
    const CView smean(in.style_mean.data(), nc), sstd(in.style_std.data(), nc);
    auto& y = out.get("adaptive_instance_norm.stats.y", img_n);
    nk::adaptive_instance_norm(x, MView(y.data(), nhwc), smean, sstd, 1e-5, nk::Layout::NHWC);
    auto& dx = out.get("adaptive_instance_norm_backward.stats.dx", img_n);
    auto& dmean = out.get("adaptive_instance_norm_backward.stats.dmean", kN * kC);
    auto& dstd = out.get("adaptive_instance_norm_backward.stats.dstd", kN * kC);
    nk::adaptive_instance_norm_backward(dy, x, smean, sstd, 1e-5, MView(dx.data(), nhwc), MView(dmean.data(), nc),
                                        MView(dstd.data(), nc), nk::Layout::NHWC);
  }

  // --- layer objects: fresh ones each time (so running statistics start the
  // same), a training forward + backward, then an eval forward.
  auto copy_buffer = [&](const std::string& name, const nk::Buffer& b) {
    auto& v = out.get(name, b.numel());
    std::memcpy(v.data(), b.data(), static_cast<size_t>(b.numel()) * sizeof(float));
  };
  {
    nk::LayerNorm layer({kCols});
    layer.weight().assign(w_rows, "weight");
    auto& y = out.get("LayerNorm.y", rows_n);
    auto& dx = out.get("LayerNorm.dx", rows_n);
    layer.forward(x_rows, MView(y.data(), rows_shape));
    layer.backward(dy_rows, MView(dx.data(), rows_shape));
    copy_buffer("LayerNorm.grad_weight", layer.grad_weight());
    copy_buffer("LayerNorm.grad_bias", layer.grad_bias());
    layer.eval();
    auto& ye = out.get("LayerNorm.eval.y", rows_n);
    layer.forward(x_rows, MView(ye.data(), rows_shape));
  }
  {
    nk::RMSNorm layer({kCols}, 1e-6);
    layer.weight().assign(w_rows, "weight");
    auto& y = out.get("RMSNorm.y", rows_n);
    auto& dx = out.get("RMSNorm.dx", rows_n);
    layer.forward(x_rows, MView(y.data(), rows_shape));
    layer.backward(dy_rows, MView(dx.data(), rows_shape));
    copy_buffer("RMSNorm.grad_weight", layer.grad_weight());
  }
  {
    const CView x(in.x_img.data(), nhwc), dy(in.dy_img.data(), nhwc);
    nk::BatchNorm layer(kC, 1e-5, 0.1, true, true, nk::Layout::NHWC);
    layer.weight().assign(w_c, "weight");
    auto& y = out.get("BatchNorm.y", img_n);
    auto& dx = out.get("BatchNorm.dx", img_n);
    layer.forward(x, MView(y.data(), nhwc));
    layer.backward(dy, MView(dx.data(), nhwc));
    copy_buffer("BatchNorm.grad_weight", layer.grad_weight());
    copy_buffer("BatchNorm.grad_bias", layer.grad_bias());
    copy_buffer("BatchNorm.running_mean", layer.running_mean());
    copy_buffer("BatchNorm.running_var", layer.running_var());
    layer.eval();
    auto& ye = out.get("BatchNorm.eval.y", img_n);
    layer.forward(x, MView(ye.data(), nhwc));
  }
  {
    const CView x(in.x_img.data(), nchw), dy(in.dy_img.data(), nchw);
    nk::InstanceNorm layer(kC, 1e-5, 0.1, true, true, nk::Layout::NCHW);
    auto& y = out.get("InstanceNorm.y", img_n);
    auto& dx = out.get("InstanceNorm.dx", img_n);
    layer.forward(x, MView(y.data(), nchw));
    layer.backward(dy, MView(dx.data(), nchw));
    copy_buffer("InstanceNorm.grad_weight", layer.grad_weight());
    copy_buffer("InstanceNorm.running_mean", layer.running_mean());
    copy_buffer("InstanceNorm.running_var", layer.running_var());
    layer.eval();
    auto& ye = out.get("InstanceNorm.eval.y", img_n);
    layer.forward(x, MView(ye.data(), nchw));
  }
  {
    const CView x(in.x_img.data(), nchw), dy(in.dy_img.data(), nchw);
    nk::GroupNorm layer(kGroups, kC, 1e-5, true, nk::Layout::NCHW);
    layer.bias().assign(b_c, "bias");
    auto& y = out.get("GroupNorm.y", img_n);
    auto& dx = out.get("GroupNorm.dx", img_n);
    layer.forward(x, MView(y.data(), nchw));
    layer.backward(dy, MView(dx.data(), nchw));
    copy_buffer("GroupNorm.grad_weight", layer.grad_weight());
    copy_buffer("GroupNorm.grad_bias", layer.grad_bias());
  }
}

// Names of the outputs that differ bit-wise from the reference (or are missing).
std::vector<std::string> differences(const Outputs& got, const Outputs& want) {
  std::vector<std::string> bad;
  for (const auto& [name, w] : want.all()) {
    auto it = got.all().find(name);
    if (it == got.all().end() || it->second.size() != w.size() ||
        std::memcmp(it->second.data(), w.data(), w.size() * sizeof(float)) != 0)
      bad.push_back(name);
  }
  if (got.all().size() != want.all().size()) bad.push_back("(a different set of outputs)");
  return bad;
}

// What one worker found.
struct WorkerResult {
  std::vector<std::string> mismatches;  // "iteration i: name"
  std::string error;                    // an exception's what()
};

// kWorkers threads, each `iterations` times: every norm on its own Inputs, compared
// with `reference`. With `churn`, one more thread keeps changing the thread count
// (and re-setting the kernel path, reading runtime_info()) until they finish.
void run_workers(const Outputs& reference, int iters, bool churn) {
  std::vector<WorkerResult> results(kWorkers);
  std::atomic<int> running{kWorkers};
  std::atomic<bool> go{false};
  std::vector<std::thread> workers;
  for (int t = 0; t < kWorkers; ++t) {
    workers.emplace_back([&, t] {
      try {
        const Inputs in;  // this thread's own data
        Outputs out;
        while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
        for (int i = 0; i < iters; ++i) {
          run_every_norm(in, out);
          for (const auto& name : differences(out, reference))
            results[t].mismatches.push_back("iteration " + std::to_string(i) + ": " + name);
        }
      } catch (const std::exception& e) {
        results[t].error = e.what();
      }
      running.fetch_sub(1, std::memory_order_acq_rel);
    });
  }
  std::thread churner;
  std::atomic<long> churns{0};
  std::string churn_error;
  if (churn) {
    churner = std::thread([&] {
      try {
        const std::string path = nk::kernel_path();
        const int counts[] = {2, 1, 3, 2, 4};
        for (int k = 0; running.load(std::memory_order_acquire) > 0; ++k) {
          nk::set_num_threads(counts[k % 5]);
          if (nk::get_num_threads() < 1) churn_error = "get_num_threads() < 1";
          if (k % 8 == 0) {
            nk::set_kernel_path(path);  // the same path: results must not change
            if (nk::runtime_info().kernel_path != path) churn_error = "kernel path changed";
          }
          std::this_thread::sleep_for(std::chrono::microseconds(200));
          churns.fetch_add(1, std::memory_order_relaxed);
        }
      } catch (const std::exception& e) {
        churn_error = e.what();
      }
    });
  }
  go.store(true, std::memory_order_release);
  for (auto& w : workers) w.join();
  if (churner.joinable()) churner.join();

  for (int t = 0; t < kWorkers; ++t) {
    EXPECT_EQ(results[t].error, "") << "worker " << t << " threw";
    std::string list;
    for (size_t k = 0; k < results[t].mismatches.size() && k < 20; ++k) list += "\n  " + results[t].mismatches[k];
    EXPECT_TRUE(results[t].mismatches.empty())
        << "worker " << t << ": " << results[t].mismatches.size()
        << " outputs differ from the serial results:" << list;
  }
  if (churn) {
    EXPECT_EQ(churn_error, "");
    EXPECT_GT(churns.load(), 0);
  }
}

// Restores the kernel path and thread count a test changed.
class RuntimeState : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = nk::kernel_path();
    threads_ = nk::get_num_threads();
  }
  void TearDown() override {
    nk::set_kernel_path(path_);
    nk::set_num_threads(threads_);
  }
  std::string path_;
  int threads_ = 1;
};

// Must stay the first test of this program: these are the process's first
// normkit calls (lazy kernel-path choice, thread-count default), from several
// threads at once.
TEST(Threads, FirstCallsFromSeveralThreadsAtOnce) {
  std::vector<std::string> paths(kWorkers);
  std::vector<int> counts(kWorkers);
  std::vector<std::thread> threads;
  std::atomic<bool> go{false};
  for (int t = 0; t < kWorkers; ++t) {
    threads.emplace_back([&, t] {
      const Inputs in;
      std::vector<float> y(in.x_rows.size());
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      nk::layer_norm(CView(in.x_rows.data(), {kRows, kCols}), MView(y.data(), {kRows, kCols}), {kCols});
      paths[t] = nk::kernel_path();
      counts[t] = nk::get_num_threads();
    });
  }
  go.store(true, std::memory_order_release);
  for (auto& t : threads) t.join();
  for (int t = 1; t < kWorkers; ++t) {
    EXPECT_EQ(paths[t], paths[0]);
    EXPECT_EQ(counts[t], counts[0]);
  }
}

using ThreadsOnPath = RuntimeState;

// On every supported kernel path: the serial results first (one thread), then
// kWorkers threads with two OpenMP threads each, then the same with a thread
// that keeps changing the thread count.
TEST_F(ThreadsOnPath, EveryNormFromSeveralThreadsMatchesSerial) {
  const auto info = nk::runtime_info();
  std::printf("[ info     ] OpenMP: %s; kernel paths supported: %zu; %d workers x %d iterations\n",
              info.build.openmp.c_str(), info.kernel_paths_supported.size(), kWorkers, iterations());
  for (const auto& path : info.kernel_paths_supported) {
    SCOPED_TRACE("kernel path " + path);
    nk::set_kernel_path(path);
    nk::set_num_threads(1);
    const Inputs in;
    Outputs reference;
    run_every_norm(in, reference);
    ASSERT_GT(reference.all().size(), 40u);

    nk::set_num_threads(2);
    run_workers(reference, iterations(), /*churn=*/false);
    run_workers(reference, iterations(), /*churn=*/true);
  }
}

}  // namespace
