// engine_demo.cpp - normkit inside a (toy) inference engine.
//
// The engine owns its buffers: float16 token embeddings with float32
// LayerNorm parameters, and a float32 NHWC image batch with BatchNorm
// running statistics. It calls normkit on views of them and checks each
// result against a plain reference loop. Then it does the same through
// normkit's layer objects (normkit::LayerNorm, normkit::BatchNorm from
// normkit/layers.hpp), loaded as an engine loads a checkpoint: weights, biases
// and running statistics copied in from raw arrays with Buffer::assign, the
// layers switched to eval mode, run on float32 and float16 buffers.
// Last, two fused steps (normkit/fused.hpp) as engines run them: a
// transformer block's residual add + RMSNorm into int8 with per-token scales,
// the sum written back into the residual buffer (vLLM's convention), and a
// U-Net block's GroupNorm + SiLU over an NHWC feature map.
// Exit status 0 means every check passed.
#include <normkit/normkit.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
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

// The same reference for float32 or float16 inputs, parameters as raw arrays.
template <class T>
std::vector<double> reference_layer_norm(const T* x, int64_t tokens, int64_t hidden, const float* gamma,
                                         const float* beta, double eps) {
  std::vector<double> y(static_cast<size_t>(tokens * hidden));
  for (int64_t t = 0; t < tokens; ++t) {
    const T* row = x + t * hidden;
    double mean = 0, var = 0;
    for (int64_t i = 0; i < hidden; ++i) mean += static_cast<float>(row[i]);
    mean /= double(hidden);
    for (int64_t i = 0; i < hidden; ++i) var += (static_cast<float>(row[i]) - mean) * (static_cast<float>(row[i]) - mean);
    var /= double(hidden);
    for (int64_t i = 0; i < hidden; ++i)
      y[t * hidden + i] = (static_cast<float>(row[i]) - mean) / std::sqrt(var + eps) * gamma[i] + beta[i];
  }
  return y;
}

// BatchNorm inference over NHWC data (channel = innermost index), in double.
template <class T>
std::vector<double> reference_batch_norm_nhwc(const T* x, int64_t count, int64_t c, const float* mean,
                                              const float* var, const float* weight, const float* bias, double eps) {
  std::vector<double> y(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    const int64_t ch = i % c;
    y[i] = (static_cast<float>(x[i]) - mean[ch]) / std::sqrt(double(var[ch]) + eps) * weight[ch] + bias[ch];
  }
  return y;
}

// Largest |got - want| / (1 + |want|).
template <class T>
double max_relative_error(const T* got, const std::vector<double>& want) {
  double err = 0;
  for (size_t i = 0; i < want.size(); ++i)
    err = std::max(err, std::abs(double(static_cast<float>(got[i])) - want[i]) / (1 + std::abs(want[i])));
  return err;
}

// A checkpoint as an engine reads it from disk: flat arrays, no normkit types.
struct Checkpoint {
  // LayerNorm(hidden): weight, bias
  std::vector<float> ln_weight, ln_bias;
  // BatchNorm2d(channels): weight, bias, running_mean, running_var, num_batches_tracked
  std::vector<float> bn_weight, bn_bias, bn_running_mean, bn_running_var;
  int64_t bn_num_batches_tracked = 0;
};

Checkpoint make_checkpoint(int64_t hidden, int64_t channels, std::mt19937& gen) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Checkpoint ck;
  for (int64_t i = 0; i < hidden; ++i) {
    ck.ln_weight.push_back(1.0f + 0.1f * normal(gen));
    ck.ln_bias.push_back(0.1f * normal(gen));
  }
  for (int64_t i = 0; i < channels; ++i) {
    ck.bn_weight.push_back(1.0f + 0.2f * normal(gen));
    ck.bn_bias.push_back(0.2f * normal(gen));
    ck.bn_running_mean.push_back(0.2f * normal(gen));
    ck.bn_running_var.push_back(0.5f + std::abs(normal(gen)));
  }
  ck.bn_num_batches_tracked = 1000;
  return ck;
}

// Copies a flat float array into a layer's buffer (shape (n,)); Buffer::assign
// checks the shape and converts to the buffer's dtype.
void load(normkit::Buffer& buffer, const std::vector<float>& values, const char* name) {
  buffer.assign(normkit::TensorView<const float>(values.data(), {static_cast<int64_t>(values.size())}), name);
}

// The layer objects of normkit/layers.hpp, loaded from a checkpoint, in eval
// mode, over float32 and float16 buffers the engine owns.
bool run_layers(std::mt19937& gen) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t tokens = 128, hidden = 512;          // LayerNorm over token embeddings
  const int64_t n = 2, h = 8, w = 8, c = 48;         // BatchNorm over an NHWC image batch
  const double eps = 1e-5;
  const Checkpoint ck = make_checkpoint(hidden, c, gen);
  bool ok = true;

  normkit::LayerNorm ln({hidden}, eps);               // float32 parameters
  normkit::BatchNorm bn(c, eps, 0.1, /*affine=*/true, /*track_running_stats=*/true, normkit::Layout::NHWC);
  try {
    load(ln.weight(), ck.ln_weight, "ln.weight");
    load(ln.bias(), ck.ln_bias, "ln.bias");
    load(bn.weight(), ck.bn_weight, "bn.weight");
    load(bn.bias(), ck.bn_bias, "bn.bias");
    load(bn.running_mean(), ck.bn_running_mean, "bn.running_mean");
    load(bn.running_var(), ck.bn_running_var, "bn.running_var");
    bn.num_batches_tracked() = ck.bn_num_batches_tracked;
  } catch (const normkit::Error& e) {
    std::printf("unexpected normkit::Error loading the checkpoint: %s\n", e.what());
    return false;
  }
  ln.eval();
  bn.eval();

  // The engine's buffers: float32 and float16 activations.
  std::vector<float> tok32(tokens * hidden), out32(tok32.size());
  std::vector<normkit::half> tok16(tok32.size()), out16(tok32.size());
  for (size_t i = 0; i < tok32.size(); ++i) {
    tok32[i] = 1.5f * normal(gen) - 0.25f;
    tok16[i] = normkit::half(tok32[i]);
  }
  std::vector<float> img32(n * h * w * c), feat32(img32.size());
  std::vector<normkit::half> img16(img32.size()), feat16(img32.size());
  for (size_t i = 0; i < img32.size(); ++i) {
    img32[i] = normal(gen);
    img16[i] = normkit::half(img32[i]);
  }

  try {
    ln.forward(normkit::TensorView<const float>(tok32.data(), {tokens, hidden}),
               normkit::TensorView<float>(out32.data(), {tokens, hidden}));
    ln.forward(normkit::TensorView<const normkit::half>(tok16.data(), {tokens, hidden}),
               normkit::TensorView<normkit::half>(out16.data(), {tokens, hidden}));
    bn.forward(normkit::TensorView<const float>(img32.data(), {n, h, w, c}),
               normkit::TensorView<float>(feat32.data(), {n, h, w, c}));
    bn.forward(normkit::TensorView<const normkit::half>(img16.data(), {n, h, w, c}),
               normkit::TensorView<normkit::half>(feat16.data(), {n, h, w, c}));
  } catch (const normkit::Error& e) {
    std::printf("unexpected normkit::Error in a layer forward: %s\n", e.what());
    return false;
  }

  // Eval mode: the running statistics are constants and stay as loaded.
  const auto* rm = static_cast<const float*>(bn.running_mean().data());
  const auto* rv = static_cast<const float*>(bn.running_var().data());
  const bool stats_kept = std::memcmp(rm, ck.bn_running_mean.data(), c * sizeof(float)) == 0 &&
                          std::memcmp(rv, ck.bn_running_var.data(), c * sizeof(float)) == 0 &&
                          bn.num_batches_tracked() == ck.bn_num_batches_tracked;
  std::printf("BatchNorm layer eval: running statistics %s\n", stats_kept ? "unchanged" : "CHANGED");
  ok = ok && stats_kept;

  struct Result {
    const char* what;
    double err, tol;
  };
  const Result results[] = {
      {"LayerNorm layer float32", max_relative_error(out32.data(), reference_layer_norm(tok32.data(), tokens, hidden,
                                                                                          ck.ln_weight.data(),
                                                                                          ck.ln_bias.data(), eps)),
       1e-5},
      {"LayerNorm layer float16", max_relative_error(out16.data(), reference_layer_norm(tok16.data(), tokens, hidden,
                                                                                          ck.ln_weight.data(),
                                                                                          ck.ln_bias.data(), eps)),
       1e-3},
      {"BatchNorm layer float32 NHWC",
       max_relative_error(feat32.data(), reference_batch_norm_nhwc(img32.data(), n * h * w * c, c, rm, rv,
                                                                   ck.bn_weight.data(), ck.bn_bias.data(), eps)),
       1e-5},
      {"BatchNorm layer float16 NHWC",
       max_relative_error(feat16.data(), reference_batch_norm_nhwc(img16.data(), n * h * w * c, c, rm, rv,
                                                                   ck.bn_weight.data(), ck.bn_bias.data(), eps)),
       1e-3},
  };
  for (const Result& r : results) {
    std::printf("%-30s: max relative error %.2e (tolerance %.0e)\n", r.what, r.err, r.tol);
    ok = ok && r.err < r.tol;
  }

  // A checkpoint array of the wrong size is an Error naming the buffer.
  try {
    load(ln.weight(), std::vector<float>(hidden - 1, 1.0f), "ln.weight");
    std::printf("expected an error for a wrong-sized checkpoint array\n");
    ok = false;
  } catch (const normkit::Error& e) {
    std::printf("error, as expected: %s\n", e.what());
  }
  return ok;
}

// --- Fused steps (normkit/fused.hpp) ------------------------------------------

// A transformer block's "add & norm" before a quantized GEMM:
//   residual += hidden                       (float16, in place)
//   q, scales = int8(rms_norm(residual))     one scale per token
// in one normkit call. Checked against a double loop over the same data.
bool run_transformer_block_step(std::mt19937& gen) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t tokens = 64, hidden = 1024;
  const double eps = 1e-6;

  // The engine's buffers: the attention output and the residual stream
  // (float16), the RMSNorm weight (float32), and the quantized activations.
  std::vector<normkit::half> hidden_states(tokens * hidden), residual(tokens * hidden);
  for (auto& v : hidden_states) v = normkit::half(normal(gen));
  for (auto& v : residual) v = normkit::half(3.0f * normal(gen));
  std::vector<float> weight(hidden);
  for (auto& v : weight) v = 1.0f + 0.1f * normal(gen);
  std::vector<std::int8_t> q(tokens * hidden);
  std::vector<float> scales(tokens);
  const std::vector<normkit::half> residual_before = residual;

  normkit::Epilogue e;
  e.quantize = normkit::Quantize::int8;  // no e.scale: dynamic, one scale per token
  e.scales = normkit::TensorView<float>(scales.data(), {tokens});
  const normkit::TensorView<normkit::half> res(residual.data(), {tokens, hidden});
  try {
    normkit::add_rms_norm(normkit::TensorView<const normkit::half>(hidden_states.data(), {tokens, hidden}),
                          res,                                                      // residual
                          normkit::TensorView<std::int8_t>(q.data(), {tokens, hidden}),  // y: int8
                          res,                                                      // sum: back into residual
                          {hidden}, normkit::TensorView<const float>(weight.data(), {hidden}), eps, {}, e);
  } catch (const normkit::Error& err) {
    std::printf("unexpected normkit::Error in add_rms_norm: %s\n", err.what());
    return false;
  }

  // Reference: the sum rounded to float16, RMSNorm of it, scale = max|y| / 127,
  // q = y / scale rounded to nearest: |q - y / scale| <= 0.5 (give or take
  // float rounding, which may tip a value at a .5 either way).
  double sum_err = 0, scale_err = 0, q_err = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<double> s(hidden);
    double mean_square = 0;
    for (int64_t i = 0; i < hidden; ++i) {
      const int64_t k = t * hidden + i;
      const double exact = double(static_cast<float>(hidden_states[k])) + double(static_cast<float>(residual_before[k]));
      s[i] = static_cast<float>(residual[k]);  // the sum as stored: what the norm reads
      sum_err = std::max(sum_err, std::abs(s[i] - exact) / (1 + std::abs(exact)));
      mean_square += s[i] * s[i];
    }
    const double rstd = 1 / std::sqrt(mean_square / double(hidden) + eps);
    double amax = 0;
    std::vector<double> y(hidden);
    for (int64_t i = 0; i < hidden; ++i) {
      y[i] = s[i] * rstd * weight[i];
      amax = std::max(amax, std::abs(y[i]));
    }
    const double scale = amax / 127;
    scale_err = std::max(scale_err, std::abs(scales[t] - scale) / scale);
    for (int64_t i = 0; i < hidden; ++i)
      q_err = std::max(q_err, std::abs(double(q[t * hidden + i]) - y[i] / scales[t]));
  }
  std::printf("add_rms_norm float16 [%lld, %lld] -> int8, per-token scales: sum error %.2e, scale error %.2e, "
              "max |q - y/scale| %.3f\n",
              static_cast<long long>(tokens), static_cast<long long>(hidden), sum_err, scale_err, q_err);
  return sum_err < 5e-4 && scale_err < 1e-5 && q_err <= 0.5 + 1e-3;
}

// A U-Net block: GroupNorm(32 groups) then SiLU, over a float32 NHWC feature
// map, in one pass: y = silu(group_norm(x)).
bool run_unet_block_step(std::mt19937& gen) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t n = 2, h = 16, w = 16, c = 128, groups = 32;
  const double eps = 1e-5;
  std::vector<float> x(n * h * w * c), y(x.size()), gamma(c), beta(c);
  for (auto& v : x) v = 2.0f * normal(gen) + 0.5f;
  for (int64_t i = 0; i < c; ++i) {
    gamma[i] = 1.0f + 0.1f * normal(gen);
    beta[i] = 0.1f * normal(gen);
  }

  normkit::Epilogue e;
  e.activation = normkit::Activation::silu;
  try {
    normkit::group_norm(normkit::TensorView<const float>(x.data(), {n, h, w, c}),
                        normkit::TensorView<float>(y.data(), {n, h, w, c}), groups,
                        normkit::TensorView<const float>(gamma.data(), {c}),
                        normkit::TensorView<const float>(beta.data(), {c}), eps, normkit::Layout::NHWC, {}, {}, e);
  } catch (const normkit::Error& err) {
    std::printf("unexpected normkit::Error in group_norm: %s\n", err.what());
    return false;
  }

  // Reference: statistics per (sample, group) over h, w and the group's
  // channels (NHWC: channel = innermost index), then the affine and SiLU.
  const int64_t per_group = c / groups, pixels = h * w;
  double err = 0;
  for (int64_t ni = 0; ni < n; ++ni)
    for (int64_t g = 0; g < groups; ++g) {
      auto at = [&](int64_t p, int64_t j) { return (ni * pixels + p) * c + g * per_group + j; };
      double mean = 0, var = 0;
      for (int64_t p = 0; p < pixels; ++p)
        for (int64_t j = 0; j < per_group; ++j) mean += x[at(p, j)];
      mean /= double(pixels * per_group);
      for (int64_t p = 0; p < pixels; ++p)
        for (int64_t j = 0; j < per_group; ++j) var += (x[at(p, j)] - mean) * (x[at(p, j)] - mean);
      var /= double(pixels * per_group);
      for (int64_t p = 0; p < pixels; ++p)
        for (int64_t j = 0; j < per_group; ++j) {
          const int64_t ch = g * per_group + j;
          const double v = (x[at(p, j)] - mean) / std::sqrt(var + eps) * gamma[ch] + beta[ch];
          const double want = v / (1 + std::exp(-v));  // silu
          err = std::max(err, std::abs(y[at(p, j)] - want) / (1 + std::abs(want)));
        }
    }
  std::printf("group_norm + silu float32 NHWC [%lld, %lld, %lld, %lld], %lld groups: max relative error %.2e\n",
              static_cast<long long>(n), static_cast<long long>(h), static_cast<long long>(w),
              static_cast<long long>(c), static_cast<long long>(groups), err);
  return err < 1e-5;
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

  // --- The same through layer objects loaded from a checkpoint ------------------
  ok = run_layers(gen) && ok;

  // --- Fused steps: add + RMSNorm into int8; GroupNorm + SiLU -------------------
  ok = run_transformer_block_step(gen) && ok;
  ok = run_unet_block_step(gen) && ok;

  std::printf("%s\n", ok ? "engine_demo: all checks passed" : "engine_demo: FAILED");
  return ok ? 0 : 1;
}
