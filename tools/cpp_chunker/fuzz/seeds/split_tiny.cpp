namespace n { int é() { return 0; } }
