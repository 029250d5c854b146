/* A small HTTP/1.1 load generator: THREADS keep-alive connections, each
 * sending requests one after the other, N requests in all.
 *   httpload HOST PORT THREADS N METHOD PATH [BODY]
 * PATH "@FILE" takes the paths from FILE, one per line, in turn. Any answer
 * but 2xx/3xx is an error (the exit status is 1). Prints one line of JSON:
 * {"n", "secs", "rate", "mean_us", "p50_us", "p99_us"}. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char *host, *method, *body;
static int port;
static char **paths;
static long npaths;
static atomic_long next_req;
static long total;
static atomic_long errors;
static double *lat;

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

static int dial(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) { perror("connect"); exit(1); }
    return fd;
}

/* Reads one response; returns its status code, or -1 when the connection closed. */
static int response(int fd, char *buf, size_t cap, size_t *have) {
    for (;;) {
        char *end = memmem(buf, *have, "\r\n\r\n", 4);
        if (end) {
            size_t head = end + 4 - buf;
            int code = atoi(buf + 9);
            long len = 0;
            char *cl = memmem(buf, head, "\ncontent-length:", 16);
            if (!cl) cl = memmem(buf, head, "\nContent-Length:", 16);
            if (cl) len = atol(cl + 16);
            while (*have < head + len) {
                ssize_t r = read(fd, buf + *have, cap - *have);
                if (r <= 0) return -1;
                *have += r;
            }
            memmove(buf, buf + head + len, *have - head - len);
            *have -= head + len;
            return code;
        }
        if (*have == cap) return -1;
        ssize_t r = read(fd, buf + *have, cap - *have);
        if (r <= 0) return -1;
        *have += r;
    }
}

static void *work(void *arg) {
    (void)arg;
    size_t cap = 1 << 20, have = 0;
    char *buf = malloc(cap), req[8192];
    int fd = dial();
    for (long i; (i = atomic_fetch_add(&next_req, 1)) < total;) {
        const char *path = paths[i % npaths];
        int n = body ? snprintf(req, sizeof req, "%s %s HTTP/1.1\r\nHost: %s:%d\r\ncontent-type: application/json\r\ncontent-length: %zu\r\n\r\n%s",
                                method, path, host, port, strlen(body), body)
                     : snprintf(req, sizeof req, "%s %s HTTP/1.1\r\nHost: %s:%d\r\n\r\n", method, path, host, port);
        double t0 = now();
        int code = -1;
        for (int attempt = 0; attempt < 2 && code < 0; attempt++) {
            if (attempt) { close(fd); fd = dial(); have = 0; }
            if (write(fd, req, n) == n) code = response(fd, buf, cap, &have);
        }
        lat[i] = now() - t0;
        if (code < 200 || code >= 400) {
            if (atomic_fetch_add(&errors, 1) < 3) fprintf(stderr, "httpload: %s %s answered %d\n", method, path, code);
        }
    }
    close(fd);
    return 0;
}

static int cmp(const void *a, const void *b) { double x = *(double *)a, y = *(double *)b; return (x > y) - (x < y); }

int main(int argc, char **argv) {
    if (argc < 7) { fprintf(stderr, "usage: httpload HOST PORT THREADS N METHOD PATH [BODY]\n"); return 2; }
    host = argv[1]; port = atoi(argv[2]);
    int threads = atoi(argv[3]);
    total = atol(argv[4]);
    method = argv[5];
    body = argc > 7 ? argv[7] : 0;
    if (argv[6][0] == '@') {
        FILE *f = fopen(argv[6] + 1, "r");
        if (!f) { perror(argv[6] + 1); return 1; }
        char line[4096];
        while (fgets(line, sizeof line, f)) {
            line[strcspn(line, "\n")] = 0;
            if (!*line) continue;
            paths = realloc(paths, sizeof(char *) * (npaths + 1));
            paths[npaths++] = strdup(line);
        }
        fclose(f);
        if (!npaths) { fprintf(stderr, "no paths in %s\n", argv[6] + 1); return 1; }
    } else {
        paths = &argv[6]; npaths = 1;
    }
    lat = calloc(total, sizeof(double));
    pthread_t t[256];
    double t0 = now();
    for (int i = 0; i < threads; i++) pthread_create(&t[i], 0, work, 0);
    for (int i = 0; i < threads; i++) pthread_join(t[i], 0);
    double dt = now() - t0, sum = 0;
    for (long i = 0; i < total; i++) sum += lat[i];
    qsort(lat, total, sizeof(double), cmp);
    printf("{\"n\": %ld, \"secs\": %.4f, \"rate\": %.1f, \"mean_us\": %.1f, \"p50_us\": %.1f, \"p99_us\": %.1f, \"errors\": %ld}\n",
           total, dt, total / dt, sum / total * 1e6, lat[total / 2] * 1e6, lat[(long)(total * 0.99)] * 1e6, (long)errors);
    return errors ? 1 : 0;
}
