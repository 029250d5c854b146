/* The durable-write floor: THREADS threads each write a small file under
 * DIR/tmp, fsync it, rename it into DIR/done and fsync DIR/done, N files in
 * all: the least any durable submit must do. Prints files/s.
 * usage: fsyncfloor DIR THREADS N */
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
static const char *dir;
static atomic_long left;
static atomic_long failed;
static int donefd;
static void *work(void *arg) {
    long me = (long)arg;
    char body[272], tmp[4096], dst[4096];
    memset(body, 'x', sizeof body);
    for (long i; (i = atomic_fetch_sub(&left, 1)) > 0;) {
        snprintf(tmp, sizeof tmp, "%s/tmp/%ld.%ld", dir, me, i);
        snprintf(dst, sizeof dst, "%s/done/%ld.%ld", dir, me, i);
        int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd < 0 || write(fd, body, sizeof body) != (ssize_t)sizeof body || fsync(fd) != 0 || close(fd) != 0
            || rename(tmp, dst) != 0 || fsync(donefd) != 0)
            atomic_fetch_add(&failed, 1);
    }
    return 0;
}
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: fsyncfloor DIR THREADS N\n"); return 2; }
    dir = argv[1];
    int threads = atoi(argv[2]);
    long n = atol(argv[3]);
    char p[4096];
    snprintf(p, sizeof p, "%s/tmp", dir); mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/done", dir); mkdir(p, 0755);
    donefd = open(p, O_RDONLY | O_DIRECTORY);
    if (donefd < 0) { perror(p); return 1; }
    atomic_store(&left, n);
    pthread_t t[64];
    double t0 = now();
    for (long i = 0; i < threads; i++) pthread_create(&t[i], 0, work, (void *)i);
    for (int i = 0; i < threads; i++) pthread_join(t[i], 0);
    double dt = now() - t0;
    if (failed) { fprintf(stderr, "%ld writes failed\n", (long)failed); return 1; }
    printf("%.1f\n", n / dt);
    return 0;
}
