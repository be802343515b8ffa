#include "a.h"
  #  include <vector>
#include_next <x.h>
#include MACRO
// #include "commented.h" is still a line comment, so: 
/* start
#include "in_comment.h"
*/
#include "b\c.h" // trailing
