#include "util.h"
int main() {}
þ#include <p/b.hpp>
struct A {};
þ#include "a.h"
struct B {};
þ#pragma once
#define U 1
