// engine_demo.cpp - normkit inside a (toy) inference engine.
//
// The engine owns its buffers: float16 token embeddings with float32
// LayerNorm parameters, and a float32 NHWC image batch with BatchNorm
// running statistics. It calls normkit on views of them and checks each
// result against a plain reference loop. Exit status 0 means every check passed.
#include <normkit/normkit.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

// LayerNorm over the last axis, in double, of float16 data.
std::vector<double> reference_layer_norm(const std::vector<normkit::half>& x, int64_t tokens, int64_t hidden,
                                         const std::vector<float>& gamma, const std::vector<float>& beta) {
  std::vector<double> y(x.size());
  for (int64_t t = 0; t < tokens; ++t) {
    double mean = 0, var = 0;
    for (int64_t i = 0; i < hidden; ++i) mean += static_cast<float>(x[t * hidden + i]);
    mean /= double(hidden);
    for (int64_t i = 0; i < hidden; ++i) {
      const double d = static_cast<float>(x[t * hidden + i]) - mean;
      var += d * d;
    }
    var /= double(hidden);
    for (int64_t i = 0; i < hidden; ++i)
      y[t * hidden + i] = (static_cast<float>(x[t * hidden + i]) - mean) / std::sqrt(var + 1e-5) * gamma[i] + beta[i];
  }
  return y;
}

}  // namespace

int main() {
  std::printf("normkit %s, kernel path %s, %d thread(s)\n", NORMKIT_VERSION_STRING, normkit::kernel_path().c_str(),
              normkit::get_num_threads());
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  bool ok = true;

  // --- LayerNorm over float16 token embeddings [tokens, hidden] ---------------
  const int64_t tokens = 256, hidden = 768;
  std::vector<normkit::half> embeddings(tokens * hidden), normalized(tokens * hidden);
  for (auto& v : embeddings) v = normkit::half(2.0f * normal(gen) + 0.5f);
  std::vector<float> gamma(hidden), beta(hidden);
  for (int64_t i = 0; i < hidden; ++i) {
    gamma[i] = 1.0f + 0.1f * normal(gen);
    beta[i] = 0.1f * normal(gen);
  }
  normkit::layer_norm(normkit::TensorView<const normkit::half>(embeddings.data(), {tokens, hidden}),
                      normkit::TensorView<normkit::half>(normalized.data(), {tokens, hidden}), {hidden},
                      normkit::TensorView<const float>(gamma.data(), {hidden}),
                      normkit::TensorView<const float>(beta.data(), {hidden}), 1e-5);
  const auto ln_ref = reference_layer_norm(embeddings, tokens, hidden, gamma, beta);
  double ln_err = 0;
  for (size_t i = 0; i < ln_ref.size(); ++i)
    ln_err = std::max(ln_err, std::abs(double(static_cast<float>(normalized[i])) - ln_ref[i]) / (1 + std::abs(ln_ref[i])));
  std::printf("layer_norm  float16 [%lld, %lld]: max relative error %.2e (float16 rounding: 4.9e-04)\n",
              static_cast<long long>(tokens), static_cast<long long>(hidden), ln_err);
  ok = ok && ln_err < 1e-3;

  // --- BatchNorm inference over an NHWC image batch [n, h, w, c] ---------------
  const int64_t n = 4, h = 16, w = 16, c = 32;
  std::vector<float> images(n * h * w * c), features(images.size());
  for (auto& v : images) v = normal(gen);
  std::vector<float> running_mean(c), running_var(c), scale(c), shift(c);
  for (int64_t i = 0; i < c; ++i) {
    running_mean[i] = 0.2f * normal(gen);
    running_var[i] = 0.5f + std::abs(normal(gen));
    scale[i] = 1.0f + 0.2f * normal(gen);
    shift[i] = 0.2f * normal(gen);
  }
  try {
    normkit::batch_norm(normkit::TensorView<const float>(images.data(), {n, h, w, c}),
                        normkit::TensorView<float>(features.data(), {n, h, w, c}),
                        normkit::TensorView<float>(running_mean.data(), {c}),
                        normkit::TensorView<float>(running_var.data(), {c}),
                        normkit::TensorView<const float>(scale.data(), {c}),
                        normkit::TensorView<const float>(shift.data(), {c}), /*training=*/false, 0.1, 1e-5,
                        normkit::Layout::NHWC);
  } catch (const normkit::Error& e) {
    std::printf("unexpected normkit::Error: %s\n", e.what());
    return 1;
  }
  double bn_err = 0;
  for (int64_t i = 0; i < n * h * w * c; ++i) {
    const int64_t ch = i % c;
    const double want =
        (images[i] - running_mean[ch]) / std::sqrt(double(running_var[ch]) + 1e-5) * scale[ch] + shift[ch];
    bn_err = std::max(bn_err, std::abs(features[i] - want) / (1 + std::abs(want)));
  }
  std::printf("batch_norm  float32 NHWC [%lld, %lld, %lld, %lld] inference: max relative error %.2e\n",
              static_cast<long long>(n), static_cast<long long>(h), static_cast<long long>(w),
              static_cast<long long>(c), bn_err);
  ok = ok && bn_err < 1e-5;

  // --- Bad input is an exception naming the argument ---------------------------
  try {
    normkit::layer_norm(normkit::TensorView<const float>(images.data(), {n, c}),
                        normkit::TensorView<float>(features.data(), {n, c}), {c + 1});
    std::printf("expected an error for a wrong normalized_shape\n");
    ok = false;
  } catch (const normkit::Error& e) {
    std::printf("error, as expected: %s\n", e.what());
  }

  std::printf("%s\n", ok ? "engine_demo: all checks passed" : "engine_demo: FAILED");
  return ok ? 0 : 1;
}
