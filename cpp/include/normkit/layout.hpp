// normkit/layout.hpp - where the channel axis is.
#pragma once

#include <string>

namespace normkit {

// N: batch, C: channels, L/H/W/D: spatial axes. Channels-first layouts are
// PyTorch's default; channels-last ones are what oneDNN calls nspc.
enum class Layout { NC, NCL, NLC, NCHW, NHWC, NCDHW, NDHWC };

// Parses "NHWC" etc. (case-sensitive). Throws Error naming `argument`.
Layout parse_layout(const std::string& name, const char* argument = "layout");
// "NC", "NCHW", "NHWC", ... (what parse_layout accepts).
const char* to_string(Layout layout);
// Number of axes the layout describes (NC: 2, NCHW: 4, ...).
int layout_rank(Layout layout);
// True when the channel axis is the last one (NC counts: channels are innermost).
bool is_channels_last(Layout layout);
// Index of the channel axis (1 for channels-first, rank-1 for channels-last).
int channel_axis(Layout layout);
// The channels-first layout of a given rank (PyTorch's default). Throws for rank < 2 or > 5.
Layout default_layout(int rank);

}  // namespace normkit
