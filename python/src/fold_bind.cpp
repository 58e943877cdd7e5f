// fold_bind.cpp - nanobind bindings of fold_batch_norm (normkit/fused.hpp)
// and of BatchNorm::fold as the method _BatchNorm._fold.
//
// The Python layer (normkit/_fold.py, normkit/_layers.py) converts the inputs
// and allocates folded_weight (weight's shape and dtype) and folded_bias
// (C_out,); all other validation is C++'s.
//   fold_batch_norm(weight, bias, running_mean, running_var, eps, bn_weight, bn_bias,
//                   folded_weight, folded_bias, transpose, groups, bf16)
//   _BatchNorm._fold(weight, bias, folded_weight, folded_bias, transpose, groups, bf16)
// bf16: bfloat16 arrays arrive as uint16 views (normkit/_dtypes.py, kernel_view).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cstdint>

#include "array_refs.hpp"
#include "normkit/fused.hpp"
#include "normkit/layers.hpp"

namespace nb = nanobind;
using namespace nb::literals;
using namespace normkit_python;

void bind_fold(nb::module_& m) {
  m.def(
      "fold_batch_norm",
      [](AnyArray weight, OptArray bias, OptArray running_mean, OptArray running_var, double eps,
         OptArray bn_weight, OptArray bn_bias, AnyArray folded_weight, AnyArray folded_bias, bool transpose,
         std::int64_t groups, bool bf16) {
        const auto wr = to_ref(weight, "weight", bf16), br = to_ref(bias, "bias", bf16);
        const auto rm = to_ref(running_mean, "running_mean", bf16), rv = to_ref(running_var, "running_var", bf16);
        const auto bw = to_ref(bn_weight, "bn_weight", bf16), bb = to_ref(bn_bias, "bn_bias", bf16);
        const auto fw = to_ref(folded_weight, "folded_weight", bf16), fb = to_ref(folded_bias, "folded_bias", bf16);
        KernelGilRelease release(wr.numel());
        normkit::fold_batch_norm(wr, br, rm, rv, eps, bw, bb, fw, fb, transpose, groups);
      },
      "weight"_a, "bias"_a.none(), "running_mean"_a.none(), "running_var"_a.none(), "eps"_a, "bn_weight"_a.none(),
      "bn_bias"_a.none(), "folded_weight"_a, "folded_bias"_a, "transpose"_a, "groups"_a, "bf16"_a);

  // A method of the class bind_layers made (it must run first).
  nb::cpp_function_def(
      [](const normkit::BatchNorm& self, AnyArray weight, OptArray bias, AnyArray folded_weight,
         AnyArray folded_bias, bool transpose, std::int64_t groups, bool bf16) {
        const auto wr = to_ref(weight, "weight", bf16), br = to_ref(bias, "bias", bf16);
        const auto fw = to_ref(folded_weight, "folded_weight", bf16), fb = to_ref(folded_bias, "folded_bias", bf16);
        KernelGilRelease release(wr.numel());
        self.fold(wr, br, fw, fb, transpose, groups);
      },
      nb::scope(nb::type<normkit::BatchNorm>()), nb::name("_fold"), nb::is_method(), "weight"_a, "bias"_a.none(),
      "folded_weight"_a, "folded_bias"_a, "transpose"_a, "groups"_a, "bf16"_a);
}
