#include <cstdio>
int main() { std::puts("vf: work in progress"); return 0; }
