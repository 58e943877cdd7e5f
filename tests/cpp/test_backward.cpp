// C++ tests of the backward functions (being written).
#include <gtest/gtest.h>
