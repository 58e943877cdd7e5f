// core/check.hpp - argument validation helpers shared by the entry points.
#pragma once

#include <initializer_list>
#include <string>

#include "normkit/error.hpp"
#include "normkit/tensor.hpp"

namespace normkit::core {

[[noreturn]] inline void fail_value(const std::string& message) { throw Error(ErrorKind::value, message); }
[[noreturn]] inline void fail_type(const std::string& message) { throw Error(ErrorKind::type, message); }

inline void require_value(bool ok, const std::string& message) {
  if (!ok) fail_value(message);
}

// eps must be a finite number >= 0.
void check_eps(double eps, const char* argument = "eps");

// A required input/output tensor must be given.
void check_given(const TensorRef& t, const char* argument);

// An array a norm reads (x, dy, style, ...) must be of a float dtype: int8 and
// float8_e4m3 are output types only.
void check_float(const TensorRef& t, const char* argument);

// `t` must have exactly `shape` and dtype `dtype`, and be contiguous.
void check_param(const TensorRef& t, const char* argument, const Dims& shape, DType dtype);

// An optional per-row statistics output: `count` contiguous elements of `dtype`.
void check_stats_output(const TensorRef& t, const char* argument, std::int64_t count, DType dtype);

// y must not overlap x unless it is exactly x (same address, same strides);
// `x_name` names x in the message.
void check_no_partial_overlap(const TensorRef& x, const TensorRef& y, const char* y_name, const char* x_name = "x");

// True when y is exactly x (in-place call).
bool same_memory(const TensorRef& a, const TensorRef& b);

// An argument and its name, for check_disjoint.
struct NamedRef {
  const TensorRef& ref;
  const char* name;
};

// Outputs share no memory with other arguments: each given, non-empty view in
// `outputs` is compared with the outputs after it and with every view in
// `others`, by the bytes they span. The in-place pairs a function allows
// (y = x, dx = x or dx = dy) are checked elsewhere and left out of both lists.
void check_disjoint(std::initializer_list<NamedRef> outputs, std::initializer_list<NamedRef> others);

}  // namespace normkit::core
