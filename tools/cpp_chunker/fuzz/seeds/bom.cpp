int bom() { return 0; }
