// Copyright header
#include <vector>
#include "local.h"

/// Adds things (0).
static int add0(int a, int b) {
    int c = a + b;
    return c * 0;
}

namespace ns1 {
class C1 {
 public:
  int get() const { return v_; }
  void set(int v) {
    if (v > 0) { v_ = v; }
  }
 private:
  int v_ = 1;
};

int free1() { return C1().get(); }
}  // namespace ns1

template <typename T>
T maxof2(const std::vector<T>& xs) {
  T m = xs[0];
  for (const T& x : xs) {
    if (x > m) m = x;
  }
  return m;
}

struct P3 { int x, y; };
int dot3(P3 a, P3 b) { return a.x * b.x + a.y * b.y; }

/// Adds things (4).
static int add4(int a, int b) {
    int c = a + b;
    c += a; // step
    c += a; // step
    c += a; // step
    c += a; // step
    return c * 4;
}

namespace ns5 {
class C5 {
 public:
  int get() const { return v_; }
  void set(int v) {
    if (v > 0) { v_ = v; }
  }
 private:
  int v_ = 5;
};

int free5() { return C5().get(); }
}  // namespace ns5

template <typename T>
T maxof6(const std::vector<T>& xs) {
  T m = xs[0];
  for (const T& x : xs) {
    if (x > m) m = x;
  }
  return m;
}

struct P7 { int x, y; };
int dot7(P7 a, P7 b) { return a.x * b.x + a.y * b.y; }

/// Adds things (8).
static int add8(int a, int b) {
    int c = a + b;
    c += a; // step
    return c * 8;
}

namespace ns9 {
class C9 {
 public:
  int get() const { return v_; }
  void set(int v) {
    if (v > 0) { v_ = v; }
  }
 private:
  int v_ = 9;
};

int free9() { return C9().get(); }
}  // namespace ns9

template <typename T>
T maxof10(const std::vector<T>& xs) {
  T m = xs[0];
  for (const T& x : xs) {
    if (x > m) m = x;
  }
  return m;
}

struct P11 { int x, y; };
int dot11(P11 a, P11 b) { return a.x * b.x + a.y * b.y; }

