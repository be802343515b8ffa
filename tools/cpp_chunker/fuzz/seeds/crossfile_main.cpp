#include "a.h"
#include <vector>
int main() { return a() + b(); }
