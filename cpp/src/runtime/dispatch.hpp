// runtime/dispatch.hpp - the kernel table in use.
#pragma once

#include <string>
#include <vector>

#include "kernels/kernel_api.hpp"

namespace normkit::runtime {

// The table of the active instruction set (chosen on first call; see
// normkit::kernel_path()). Throws Error if NORMKIT_ISA asks for a path the CPU lacks.
const kernels::IsaKernels& active_kernels();

std::vector<std::string> compiled_kernel_paths();
std::vector<std::string> supported_kernel_paths();

}  // namespace normkit::runtime
