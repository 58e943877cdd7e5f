// normkit/error.hpp - the one exception type normkit throws.
#pragma once

#include <stdexcept>
#include <string>

namespace normkit {

// What kind of mistake the caller made. Python maps `value` to ValueError and
// `type` to TypeError; C++ callers can branch on it or just print what().
enum class ErrorKind { value, type };

// Every error normkit reports is an Error. what() names the offending
// argument first ("weight: expected shape (768), got (767)").
class Error : public std::invalid_argument {
 public:
  // An error of `kind`; `message` starts with the argument's name.
  Error(ErrorKind kind, const std::string& message)
      : std::invalid_argument(message), kind_(kind) {}
  // Which kind of mistake: a wrong value/shape (value) or a wrong dtype (type).
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

}  // namespace normkit
