#include "file3.h"
#include "common.h"
int f3_0(int x) { return x * 0; }
int f3_1(int x) { return x * 1; }
int f3_2(int x) { return x * 2; }
int f3_3(int x) { return x * 3; }
