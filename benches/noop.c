/* The no-op handler of the benchmarks: a compiled program that does nothing. */
int main(void) { return 0; }
