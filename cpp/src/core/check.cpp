#include "core/check.hpp"

#include <cmath>
#include <cstdint>
#include <sstream>

namespace normkit::core {

void check_eps(double eps, const char* argument) {
  if (!std::isfinite(eps) || eps < 0) {
    std::ostringstream s;
    s << argument << ": must be a finite number >= 0, got " << eps;
    fail_value(s.str());
  }
}

void check_float(const TensorRef& t, const char* argument) {
  if (!is_float(t.dtype))
    fail_type(std::string(argument) + ": expected a float dtype (float32, float64, float16 or bfloat16), got " +
              to_string(t.dtype) + " (a quantized type is only ever an output)");
}

void check_given(const TensorRef& t, const char* argument) {
  if (!t.given) fail_value(std::string(argument) + ": is required");
  for (int i = 0; i < t.shape.size(); ++i)
    if (t.shape[i] < 0) fail_value(std::string(argument) + ": negative extent in shape " + t.shape.to_string());
  if (t.data == nullptr && t.numel() != 0) fail_value(std::string(argument) + ": null data pointer");
}

void check_param(const TensorRef& t, const char* argument, const Dims& shape, DType dtype) {
  check_given(t, argument);
  if (t.shape != shape)
    fail_value(std::string(argument) + ": expected shape " + shape.to_string() + ", got " + t.shape.to_string());
  if (t.dtype != dtype)
    fail_type(std::string(argument) + ": expected dtype " + to_string(dtype) + ", got " + to_string(t.dtype));
  if (!t.is_contiguous()) fail_value(std::string(argument) + ": must be contiguous");
}

void check_stats_output(const TensorRef& t, const char* argument, std::int64_t count, DType dtype) {
  check_given(t, argument);
  if (t.numel() != count)
    fail_value(std::string(argument) + ": expected " + std::to_string(count) + " elements, got shape " +
               t.shape.to_string());
  if (t.dtype != dtype)
    fail_type(std::string(argument) + ": expected dtype " + to_string(dtype) + ", got " + to_string(t.dtype));
  if (!t.is_contiguous()) fail_value(std::string(argument) + ": must be contiguous");
}

namespace {
// [first, last) bytes spanned by a view (empty view: empty range).
void byte_span(const TensorRef& t, std::uintptr_t& first, std::uintptr_t& last) {
  const auto base = reinterpret_cast<std::uintptr_t>(t.data);
  first = last = base;
  if (t.numel() == 0) return;
  std::int64_t lo = 0, hi = 0;
  for (int i = 0; i < t.shape.size(); ++i) {
    const std::int64_t extent = (t.shape[i] - 1) * t.strides[i];
    (extent < 0 ? lo : hi) += extent;
  }
  const std::int64_t size = element_size(t.dtype);
  first = base + lo * size;
  last = base + (hi + 1) * size;
}
}  // namespace

bool same_memory(const TensorRef& a, const TensorRef& b) {
  return a.data == b.data && a.shape == b.shape && a.strides == b.strides && a.dtype == b.dtype;
}

void check_disjoint(std::initializer_list<NamedRef> outputs, std::initializer_list<NamedRef> others) {
  auto overlap = [](const TensorRef& a, const TensorRef& b) {
    if (!a.given || !b.given) return false;
    std::uintptr_t a0, a1, b0, b1;
    byte_span(a, a0, a1);
    byte_span(b, b0, b1);
    // An empty view touches no byte, wherever its pointer lies.
    return a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1;
  };
  for (auto out = outputs.begin(); out != outputs.end(); ++out) {
    auto fail_with = [&](const char* other) {
      fail_value(std::string(out->name) + ": shares memory with " + other +
                 " (an output must not overlap any other argument)");
    };
    for (auto later = out + 1; later != outputs.end(); ++later)
      if (overlap(out->ref, later->ref)) fail_with(later->name);
    for (const NamedRef& other : others)
      if (overlap(out->ref, other.ref)) fail_with(other.name);
  }
}

void check_no_partial_overlap(const TensorRef& x, const TensorRef& y, const char* y_name, const char* x_name) {
  if (same_memory(x, y)) return;
  std::uintptr_t x0, x1, y0, y1;
  byte_span(x, x0, x1);
  byte_span(y, y0, y1);
  if (x0 < x1 && y0 < y1 && x0 < y1 && y0 < x1)
    fail_value(std::string(y_name) + ": overlaps " + x_name + " without being " + x_name + " itself (in place needs " +
               y_name + " to be exactly " + x_name + ")");
}

}  // namespace normkit::core
