int f() { return 1; }
struct S { void g() {} };
