#include <proj/api.h>
#include "lib.h"
#include "../util.h"
#include "missing.h"
int x;
