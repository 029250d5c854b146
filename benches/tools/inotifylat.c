/* inotify's own latency for a rename: one thread blocks in read() on an
 * inotify watch of DIR/in (IN_MOVED_TO); the main thread reads CLOCK_REALTIME,
 * renames a file from DIR/out into DIR/in, and the reader reads the clock as
 * soon as read() returns; the file is moved back out before the next one. Prints one latency per line, in ns.
 * usage: inotifylat DIR N */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
static int ifd;
static atomic_llong woke;
static long long now(void) { struct timespec t; clock_gettime(CLOCK_REALTIME, &t); return t.tv_sec * 1000000000LL + t.tv_nsec; }
static void *reader(void *arg) {
    (void)arg;
    char buf[4096] __attribute__((aligned(8)));
    for (;;) {
        if (read(ifd, buf, sizeof buf) <= 0) return 0;
        atomic_store(&woke, now());
    }
}
int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: inotifylat DIR N\n"); return 2; }
    int n = atoi(argv[2]);
    char in[4096], out[4096], a[4200], b[4200];
    snprintf(in, sizeof in, "%s/in", argv[1]); mkdir(in, 0755);
    snprintf(out, sizeof out, "%s/out", argv[1]); mkdir(out, 0755);
    ifd = inotify_init1(IN_CLOEXEC);
    if (ifd < 0 || inotify_add_watch(ifd, in, IN_MOVED_TO) < 0) { perror("inotify"); return 1; }
    pthread_t t;
    pthread_create(&t, 0, reader, 0);
    long long *lat = malloc(sizeof(long long) * n);
    /* One file goes back and forth, so the measure frees no inodes. */
    snprintf(a, sizeof a, "%s/f", out);
    snprintf(b, sizeof b, "%s/f", in);
    close(open(a, O_WRONLY | O_CREAT, 0644));
    for (int i = 0; i < n; i++) {
        usleep(200);  /* let the reader block again */
        atomic_store(&woke, 0);
        long long t0 = now();
        if (rename(a, b) != 0) { perror("rename"); return 1; }
        long long t1;
        while (!(t1 = atomic_load(&woke))) usleep(20);
        lat[i] = t1 - t0;
        rename(b, a);
    }
    for (int i = 0; i < n; i++) printf("%lld\n", lat[i]);
    return 0;
}
