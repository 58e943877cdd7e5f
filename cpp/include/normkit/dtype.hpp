// normkit/dtype.hpp - element types: float, double, half (IEEE binary16), bfloat16.
#pragma once

#include <cstdint>
#include <type_traits>

namespace normkit {

namespace detail {
#include "normkit/detail/float16_bits.inc"
}  // namespace detail

// IEEE 754 binary16. Storage only: normkit widens to float to compute.
struct half {
  std::uint16_t bits = 0;
  half() = default;
  explicit half(float f) : bits(detail::nk_float_to_half_bits(f)) {}
  static half from_bits(std::uint16_t b) { half h; h.bits = b; return h; }
  explicit operator float() const { return detail::nk_half_bits_to_float(bits); }
};

// bfloat16: the upper 16 bits of a float. Storage only, like half.
struct bfloat16 {
  std::uint16_t bits = 0;
  bfloat16() = default;
  explicit bfloat16(float f) : bits(detail::nk_float_to_bf16_bits(f)) {}
  static bfloat16 from_bits(std::uint16_t b) { bfloat16 h; h.bits = b; return h; }
  explicit operator float() const { return detail::nk_bf16_bits_to_float(bits); }
};

static_assert(sizeof(half) == 2 && sizeof(bfloat16) == 2, "16-bit types must be 2 bytes");

enum class DType : std::uint8_t { float32, float64, float16, bfloat16 };

const char* to_string(DType dtype);
int element_size(DType dtype);

// The dtype that statistics (mean, rstd) and accumulation use: float for
// float32 and the 16-bit types, double for float64.
inline DType stats_dtype(DType dtype) {
  return dtype == DType::float64 ? DType::float64 : DType::float32;
}

template <class T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::float32; };
template <> struct dtype_of<double> { static constexpr DType value = DType::float64; };
template <> struct dtype_of<half> { static constexpr DType value = DType::float16; };
template <> struct dtype_of<bfloat16> { static constexpr DType value = DType::bfloat16; };
template <class T> struct dtype_of<const T> : dtype_of<T> {};

// acc_t<T>: the accumulation / statistics type for element type T.
template <class T>
using acc_t = std::conditional_t<std::is_same_v<std::remove_const_t<T>, double>, double, float>;

}  // namespace normkit
