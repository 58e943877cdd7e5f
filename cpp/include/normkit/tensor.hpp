// normkit/tensor.hpp - non-owning views over caller-owned memory.
//
// A view is a pointer plus shape plus strides, strides counted in elements
// (as PyTorch and DLPack do), so the same memory can be described whatever
// its layout. normkit never allocates or frees the memory behind a view.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "normkit/dtype.hpp"
#include "normkit/error.hpp"

namespace normkit {

// The largest rank normkit handles (NCDHW is 5; headroom for LayerNorm).
constexpr int kMaxRank = 8;

// A small fixed-capacity list of extents or strides.
class Dims {
 public:
  // An empty list (rank 0).
  Dims() = default;
  // From a brace list: Dims{8, 768}. Throws Error past kMaxRank entries.
  Dims(std::initializer_list<std::int64_t> values) {
    for (std::int64_t v : values) push_back(v);
  }
  // From an iterator range of integers. Throws Error past kMaxRank entries.
  template <class It>
  Dims(It first, It last) {
    for (; first != last; ++first) push_back(static_cast<std::int64_t>(*first));
  }

  // Appends one entry; throws Error (kind value) past kMaxRank entries.
  void push_back(std::int64_t v) {
    if (size_ >= kMaxRank)
      throw Error(ErrorKind::value, "rank exceeds normkit's maximum of " + std::to_string(kMaxRank));
    values_[size_++] = v;
  }
  // Number of entries (the rank, for a shape).
  int size() const { return size_; }
  // True when there are no entries.
  bool empty() const { return size_ == 0; }
  // Entry i (unchecked; 0 <= i < size()).
  std::int64_t& operator[](int i) { return values_[i]; }
  std::int64_t operator[](int i) const { return values_[i]; }
  // Iteration over the entries (range-for).
  const std::int64_t* begin() const { return values_; }
  const std::int64_t* end() const { return values_ + size_; }

  // Product of all entries (1 for an empty list).
  std::int64_t product() const {
    std::int64_t p = 1;
    for (int i = 0; i < size_; ++i) p *= values_[i];
    return p;
  }
  // Same rank and entries.
  friend bool operator==(const Dims& a, const Dims& b) {
    if (a.size_ != b.size_) return false;
    for (int i = 0; i < a.size_; ++i)
      if (a.values_[i] != b.values_[i]) return false;
    return true;
  }
  friend bool operator!=(const Dims& a, const Dims& b) { return !(a == b); }

  // "(8, 768)", for error messages.
  std::string to_string() const {
    std::string s = "(";
    for (int i = 0; i < size_; ++i) s += (i ? ", " : "") + std::to_string(values_[i]);
    return s + (size_ == 1 ? ",)" : ")");
  }

 private:
  std::int64_t values_[kMaxRank] = {};
  int size_ = 0;
};

// Row-major (C-order) strides for a shape.
inline Dims contiguous_strides(const Dims& shape) {
  Dims strides = shape;
  std::int64_t s = 1;
  for (int i = shape.size() - 1; i >= 0; --i) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
}

// A typed view. TensorView<const float> for inputs, TensorView<float> for outputs.
template <class T>
struct TensorView {
  T* data = nullptr;
  Dims shape;
  Dims strides;

  // A null view (no data, rank 0).
  TensorView() = default;
  // A row-major contiguous view of `shape_` at `data_`.
  TensorView(T* data_, Dims shape_) : data(data_), shape(shape_), strides(contiguous_strides(shape_)) {}
  // A strided view; strides in elements, one per axis of `shape_`.
  TensorView(T* data_, Dims shape_, Dims strides_) : data(data_), shape(shape_), strides(strides_) {}
  // A view of non-const data is also a view of const data.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T>>>
  TensorView(const TensorView<U>& other) : data(other.data), shape(other.shape), strides(other.strides) {}

  // Number of elements (product of the shape).
  std::int64_t numel() const { return shape.product(); }
};

// A type-erased view: what normkit's entry points take. Built implicitly from
// any TensorView<T>; a default-constructed TensorRef means "not given"
// (no weight, no statistics output, ...).
struct TensorRef {
  void* data = nullptr;
  DType dtype = DType::float32;
  Dims shape;
  Dims strides;
  bool given = false;

  // "Not given" (given == false): an omitted optional argument.
  TensorRef() = default;
  // A view of `dtype_` elements at `data_`; strides in elements.
  TensorRef(void* data_, DType dtype_, Dims shape_, Dims strides_)
      : data(data_), dtype(dtype_), shape(shape_), strides(strides_), given(true) {}
  // From a typed view (dtype from T); implicit, so functions take TensorView<T> directly.
  template <class T>
  TensorRef(const TensorView<T>& view)  // NOLINT: implicit on purpose
      : data(const_cast<std::remove_const_t<T>*>(view.data)),
        dtype(dtype_of<T>::value),
        shape(view.shape),
        strides(view.strides),
        given(true) {}

  // Number of elements (product of the shape).
  std::int64_t numel() const { return shape.product(); }
  // True when the elements are row-major contiguous (size-1 axes' strides ignored).
  bool is_contiguous() const {
    if (numel() == 0) return true;  // no element to place
    std::int64_t expected = 1;
    for (int i = shape.size() - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expected) return false;
      expected *= shape[i];
    }
    return true;
  }
};

}  // namespace normkit
