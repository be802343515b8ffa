namespace outer {
class Big {
 public:
  int m0(int x) {
    return x + 0;
  }
  int m1(int x) {
    return x + 1;
  }
  int m2(int x) {
    return x + 2;
  }
  int m3(int x) {
    return x + 3;
  }
  int m4(int x) {
    return x + 4;
  }
  int m5(int x) {
    return x + 5;
  }
  int m6(int x) {
    return x + 6;
  }
  int m7(int x) {
    return x + 7;
  }
  int m8(int x) {
    return x + 8;
  }
  int m9(int x) {
    return x + 9;
  }
  int m10(int x) {
    return x + 10;
  }
  int m11(int x) {
    return x + 11;
  }
};
}  // namespace outer
