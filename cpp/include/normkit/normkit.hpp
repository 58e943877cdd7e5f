// normkit/normkit.hpp - everything in one include.
#pragma once

#include "normkit/axis_norms.hpp"
#include "normkit/cuda.hpp"
#include "normkit/dtype.hpp"
#include "normkit/error.hpp"
#include "normkit/fused.hpp"
#include "normkit/layers.hpp"
#include "normkit/layout.hpp"
#include "normkit/moments.hpp"
#include "normkit/norms.hpp"
#include "normkit/runtime.hpp"
#include "normkit/tensor.hpp"
#include "normkit/version.hpp"
