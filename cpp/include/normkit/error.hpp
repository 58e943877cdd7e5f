// normkit/error.hpp - the one exception type normkit throws.
#pragma once

#include <stdexcept>
#include <string>

namespace normkit {

// What kind of mistake the caller made. Python maps `value` to ValueError,
// `type` to TypeError and `runtime` to RuntimeError; C++ callers can branch on
// it or just print what(). `runtime` is a failure of the environment rather
// than of an argument: no CUDA device, a CUDA error, a build without CUDA.
enum class ErrorKind { value, type, runtime };

// Every error normkit reports is an Error. what() names the offending
// argument first ("weight: expected shape (768), got (767)").
class Error : public std::invalid_argument {
 public:
  // An error of `kind`; `message` starts with the argument's name.
  Error(ErrorKind kind, const std::string& message)
      : std::invalid_argument(message), kind_(kind) {}
  // Which kind of mistake: a wrong value/shape (value), a wrong dtype (type),
  // or the environment (runtime).
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

}  // namespace normkit
