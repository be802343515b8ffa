// doc for a
int a() { return 1; }
// doc for b
int b() { return 2; }
