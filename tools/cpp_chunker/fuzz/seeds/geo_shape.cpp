#include "shape.h"

namespace geo {
double Shape::area() const { return side_ * side_; }
}  // namespace geo
