#pragma once
#include "b.h"
inline int a() { return b(); }
