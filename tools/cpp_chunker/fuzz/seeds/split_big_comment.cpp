/*
a comment line
a comment line
a comment line
a comment line
a comment line
a comment line
a comment line
a comment line
a comment line
a comment line
a comment line
a comment line
a comment line
a comment line
a comment line
a comment line
a comment line
a comment line
a comment line
a comment line
*/
int x;
