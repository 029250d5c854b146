/* The spawn floor: THREADS threads each start PROG (posix_spawn, the way
 * Rust's std::process does) and wait for it, N times in all. Prints runs/s.
 * usage: spawnfloor PROG THREADS N */
#include <pthread.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
extern char **environ;
static const char *prog;
static atomic_long left;
static atomic_long failed;
static void *work(void *arg) {
    (void)arg;
    char *argv[] = {(char *)prog, 0};
    while (atomic_fetch_sub(&left, 1) > 0) {
        pid_t pid;
        int st;
        if (posix_spawn(&pid, prog, 0, 0, argv, environ) != 0 || waitpid(pid, &st, 0) < 0 || st != 0)
            atomic_fetch_add(&failed, 1);
    }
    return 0;
}
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: spawnfloor PROG THREADS N\n"); return 2; }
    prog = argv[1];
    int threads = atoi(argv[2]);
    long n = atol(argv[3]);
    atomic_store(&left, n);
    pthread_t t[64];
    double t0 = now();
    for (int i = 0; i < threads; i++) pthread_create(&t[i], 0, work, 0);
    for (int i = 0; i < threads; i++) pthread_join(t[i], 0);
    double dt = now() - t0;
    if (failed) { fprintf(stderr, "%ld runs failed\n", (long)failed); return 1; }
    printf("%.1f\n", n / dt);
    return 0;
}
