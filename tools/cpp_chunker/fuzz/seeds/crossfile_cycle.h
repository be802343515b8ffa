#include "b.h"
struct A {};
