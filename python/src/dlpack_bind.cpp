// dlpack_bind.cpp - dlpack_view(obj, name): an array of another library, given as an
// object with __dlpack__ or as a DLPack capsule (which can be consumed once), as a NumPy
// array of the same memory. Used by normkit/_arrays.py for everything that is neither a
// NumPy array nor a torch tensor.
//
// NumPy's own from_dlpack refuses bfloat16, which is what 16-bit models hold, so the
// import is nanobind's: a bfloat16 array comes back as a uint16 view of its bits (the
// Python side views it as ml_dtypes.bfloat16), flagged by the second result.
//   dlpack_view(obj, name) -> (numpy array, is_bfloat16)
// The view is read-only when the producer marks its memory read-only (DLPack 1.x).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using Imported = nb::ndarray<nb::ro, nb::device::cpu>;

// A NumPy view of `a`'s memory (dtype `dt`), keeping the import alive while it lives.
template <class... Flags>
nb::object numpy_view(const Imported& a, nb::dlpack::dtype dt) {
  const std::size_t ndim = a.ndim();
  std::vector<std::size_t> shape(ndim);
  std::vector<std::int64_t> strides(ndim);
  for (std::size_t i = 0; i < ndim; ++i) {
    shape[i] = a.shape(i);
    strides[i] = a.stride(i);
  }
  auto* keep = new Imported(a);
  nb::capsule owner(keep, [](void* p) noexcept { delete static_cast<Imported*>(p); });
  nb::ndarray<nb::numpy, Flags...> view(const_cast<void*>(a.data()), ndim, shape.data(), owner, strides.data(), dt);
  return nb::cast(view, nb::rv_policy::reference);
}

[[noreturn]] void refuse(const char* name, const std::string& why) {
  throw nb::value_error((std::string(name) + ": " + why).c_str());
}

}  // namespace

void bind_dlpack(nb::module_& m) {
  m.def(
      "dlpack_view",
      [](nb::handle obj, const char* name) {
        if (PyCapsule_CheckExact(obj.ptr())) {
          const char* cap = PyCapsule_GetName(obj.ptr());
          if (cap != nullptr && std::strncmp(cap, "used_", 5) == 0)
            refuse(name, "is a DLPack capsule that was already consumed (a capsule can be read once: call the "
                         "array's __dlpack__() again for a new one)");
          if (cap == nullptr || std::strncmp(cap, "dltensor", 8) != 0)
            refuse(name, "is a capsule that is not a DLPack tensor");
        }
        // Writable when the producer allows it (an `out` must be); a failed try consumes nothing.
        bool writable = true;
        nb::ndarray<nb::device::cpu> w;
        Imported a;
        if (nb::try_cast(obj, w, /*convert=*/false)) {
          a = Imported(w);
        } else if (nb::try_cast(obj, a, /*convert=*/false)) {
          writable = false;
        } else {
          refuse(name, "could not be imported through DLPack as an array in CPU memory (it is on another device, "
                       "or its dtype is one DLPack does not describe)");
        }
        nb::dlpack::dtype dt = a.dtype();
        const bool bf16 = dt.code == static_cast<std::uint8_t>(nb::dlpack::dtype_code::Bfloat) && dt.bits == 16;
        if (bf16) dt = nb::dtype<std::uint16_t>();
        nb::object view = writable ? numpy_view<>(a, dt) : numpy_view<nb::ro>(a, dt);
        return nb::make_tuple(view, bf16);
      },
      "obj"_a, "name"_a,
      "(NumPy view of a DLPack array's memory, is_bfloat16); bfloat16 comes back as its uint16 bits.");
}
