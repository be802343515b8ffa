// café ÿş
int main() { return 0; }
