// C++ tests of the layer classes (being written).
#include <gtest/gtest.h>
