// layers/layers.cpp - the stateful layer classes (normkit/layers.hpp).
// (Being written.)
#include "normkit/layers.hpp"
