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
  // +0.0.
  half() = default;
  // Rounds f to the nearest binary16 (ties to even; overflow to infinity).
  explicit half(float f) : bits(detail::nk_float_to_half_bits(f)) {}
  // The half with these raw bits.
  static half from_bits(std::uint16_t b) { half h; h.bits = b; return h; }
  // Widens to float (exact).
  explicit operator float() const { return detail::nk_half_bits_to_float(bits); }
};

// bfloat16: the upper 16 bits of a float. Storage only, like half.
struct bfloat16 {
  std::uint16_t bits = 0;
  // +0.0.
  bfloat16() = default;
  // Rounds f to the nearest bfloat16 (ties to even).
  explicit bfloat16(float f) : bits(detail::nk_float_to_bf16_bits(f)) {}
  // The bfloat16 with these raw bits.
  static bfloat16 from_bits(std::uint16_t b) { bfloat16 h; h.bits = b; return h; }
  // Widens to float (exact).
  explicit operator float() const { return detail::nk_bf16_bits_to_float(bits); }
};

static_assert(sizeof(half) == 2 && sizeof(bfloat16) == 2, "16-bit types must be 2 bytes");

// OCP float8 E4M3 ("e4m3fn": no infinities; largest finite 448), raw bits.
// Only ever an output: the quantized store of a norm (normkit/fused.hpp).
struct float8_e4m3 {
  std::uint8_t bits = 0;
  // +0.0.
  float8_e4m3() = default;
  // Rounds f to the nearest E4M3 (ties to even), saturating to +-448; NaN stays NaN.
  explicit float8_e4m3(float f) : bits(detail::nk_float_to_e4m3_bits(f)) {}
  // The float8_e4m3 with these raw bits.
  static float8_e4m3 from_bits(std::uint8_t b) { float8_e4m3 h; h.bits = b; return h; }
  // Widens to float (exact).
  explicit operator float() const { return detail::nk_e4m3_bits_to_float(bits); }
};

static_assert(sizeof(float8_e4m3) == 1, "float8_e4m3 must be 1 byte");

// The element type of a TensorRef: the four float types, and the two
// quantized output types (int8, float8_e4m3), which only a quantized norm's
// output may have (any other argument of those dtypes is an Error).
enum class DType : std::uint8_t { float32, float64, float16, bfloat16, int8, float8_e4m3 };

// "float32", "float64", "float16", "bfloat16", "int8" or "float8_e4m3".
const char* to_string(DType dtype);
// Bytes per element (4, 8, 2, 2, 1, 1).
int element_size(DType dtype);
// True for the four float types (the ones a norm reads).
inline bool is_float(DType dtype) {
  return dtype == DType::float32 || dtype == DType::float64 || dtype == DType::float16 || dtype == DType::bfloat16;
}

// The dtype that statistics (mean, rstd) and accumulation use: float for
// float32 and the 16-bit types, double for float64.
inline DType stats_dtype(DType dtype) {
  return dtype == DType::float64 ? DType::float64 : DType::float32;
}

// dtype_of<T>::value: the DType of element type T (const ignored).
template <class T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::float32; };
template <> struct dtype_of<double> { static constexpr DType value = DType::float64; };
template <> struct dtype_of<half> { static constexpr DType value = DType::float16; };
template <> struct dtype_of<bfloat16> { static constexpr DType value = DType::bfloat16; };
template <> struct dtype_of<std::int8_t> { static constexpr DType value = DType::int8; };
template <> struct dtype_of<float8_e4m3> { static constexpr DType value = DType::float8_e4m3; };
template <class T> struct dtype_of<const T> : dtype_of<T> {};

// acc_t<T>: the accumulation / statistics type for element type T.
template <class T>
using acc_t = std::conditional_t<std::is_same_v<std::remove_const_t<T>, double>, double, float>;

}  // namespace normkit
