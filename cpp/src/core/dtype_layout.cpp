// core/dtype_layout.cpp - names and properties of dtypes and layouts.
#include <string>

#include "core/check.hpp"
#include "normkit/dtype.hpp"
#include "normkit/layout.hpp"

namespace normkit {

const char* to_string(DType dtype) {
  switch (dtype) {
    case DType::float32: return "float32";
    case DType::float64: return "float64";
    case DType::float16: return "float16";
    case DType::bfloat16: return "bfloat16";
    case DType::int8: return "int8";
    case DType::float8_e4m3: return "float8_e4m3";
  }
  return "unknown";
}

int element_size(DType dtype) {
  switch (dtype) {
    case DType::float32: return 4;
    case DType::float64: return 8;
    case DType::float16:
    case DType::bfloat16: return 2;
    case DType::int8:
    case DType::float8_e4m3: return 1;
  }
  return 0;
}

namespace {
struct LayoutInfo {
  Layout layout;
  const char* name;
  int rank;
  bool channels_last;
};
constexpr LayoutInfo kLayouts[] = {
    {Layout::NC, "NC", 2, true},        {Layout::NCL, "NCL", 3, false},     {Layout::NLC, "NLC", 3, true},
    {Layout::NCHW, "NCHW", 4, false},   {Layout::NHWC, "NHWC", 4, true},    {Layout::NCDHW, "NCDHW", 5, false},
    {Layout::NDHWC, "NDHWC", 5, true},
};
const LayoutInfo& info(Layout layout) {
  for (const auto& entry : kLayouts)
    if (entry.layout == layout) return entry;
  core::fail_value("layout: unknown enum value");
}
}  // namespace

Layout parse_layout(const std::string& name, const char* argument) {
  for (const auto& entry : kLayouts)
    if (name == entry.name) return entry.layout;
  core::fail_value(std::string(argument) + ": unknown layout '" + name +
                   "' (expected one of NC, NCL, NLC, NCHW, NHWC, NCDHW, NDHWC)");
}

const char* to_string(Layout layout) { return info(layout).name; }
int layout_rank(Layout layout) { return info(layout).rank; }
bool is_channels_last(Layout layout) { return info(layout).channels_last; }
int channel_axis(Layout layout) { return info(layout).channels_last ? info(layout).rank - 1 : 1; }

Layout default_layout(int rank) {
  switch (rank) {
    case 2: return Layout::NC;
    case 3: return Layout::NCL;
    case 4: return Layout::NCHW;
    case 5: return Layout::NCDHW;
    default:
      core::fail_value("x: rank " + std::to_string(rank) + " has no channel layout (expected 2 to 5 dims)");
  }
}

}  // namespace normkit
