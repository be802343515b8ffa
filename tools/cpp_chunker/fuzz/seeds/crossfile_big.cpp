#include "h.h"
int f0() { return 0; }
int f1() { return 1; }
int f2() { return 2; }
int f3() { return 3; }
int f4() { return 4; }
int f5() { return 5; }
int f6() { return 6; }
int f7() { return 7; }
int f8() { return 8; }
int f9() { return 9; }
int f10() { return 10; }
int f11() { return 11; }
