// layers_bind.cpp - nanobind bindings of the layer classes (being written).
#include <nanobind/nanobind.h>

namespace nb = nanobind;

void bind_layers(nb::module_& m) { (void)m; }
