#pragma once

namespace geo {
class Shape {
 public:
  explicit Shape(double side) : side_(side) {}
  double area() const;

 private:
  double side_;
};
}  // namespace geo
