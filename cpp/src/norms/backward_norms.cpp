// norms/backward_norms.cpp - gradients of every norm (normkit/norms.hpp).
// (Being written: every entry point throws until its kernels land.)
#include "core/check.hpp"
#include "normkit/norms.hpp"

namespace normkit {

namespace {
[[noreturn]] void pending(const char* name) { core::fail_value(std::string(name) + ": not implemented yet"); }
}  // namespace

void layer_norm_backward(const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&, const Dims&,
                         const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&) {
  pending("layer_norm_backward");
}
void rms_norm_backward(const TensorRef&, const TensorRef&, const TensorRef&, const Dims&, const TensorRef&,
                       const TensorRef&, const TensorRef&) {
  pending("rms_norm_backward");
}
void batch_norm_backward(const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&,
                         const TensorRef&, const TensorRef&, const TensorRef&, bool, std::optional<Layout>) {
  pending("batch_norm_backward");
}
void instance_norm_backward(const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&,
                            const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&, bool,
                            std::optional<Layout>) {
  pending("instance_norm_backward");
}
void group_norm_backward(const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&, std::int64_t,
                         const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&,
                         std::optional<Layout>) {
  pending("group_norm_backward");
}
void adaptive_instance_norm_backward(const TensorRef&, const TensorRef&, const TensorRef&, double,
                                     const TensorRef&, const TensorRef&, std::optional<Layout>) {
  pending("adaptive_instance_norm_backward");
}
void adaptive_instance_norm_backward(const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&, double,
                                     const TensorRef&, const TensorRef&, const TensorRef&, std::optional<Layout>) {
  pending("adaptive_instance_norm_backward");
}

}  // namespace normkit
