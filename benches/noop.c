/* The no-op handler of the benchmarks: a compiled program that does nothing.
 * Given a path (as incron passes one: `noop $@/$#`), it removes that file, so
 * the benchmark can tell when incron has run it for every file; spoold passes
 * no arguments, so there it does nothing at all. */
#include <unistd.h>
int main(int argc, char **argv) { return argc > 1 ? unlink(argv[1]) != 0 : 0; }
