/* N Server-Sent Events subscribers in one process (epoll), for the fan-out
 * measure.
 *   sseclient HOST PORT PATH N READY MARKER OUTFILE TIMEOUT_S
 * Phase 1 opens N connections (at most 256 connecting at a time, so the
 * server's accept backlog never overflows) and waits until each has received
 * READY (spoold: "data:", the current status; nchan: ": hi", its greeting);
 * then it prints "ready" and the time it took. Phase 2
 * waits until each stream has carried MARKER, noting CLOCK_REALTIME (ns) when
 * it did; it writes those times, one per line, to OUTFILE and prints
 * "done <received> <closed early>". Raise `ulimit -n` above N first. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { CONNECTING, WAITING_FIRST, READY, GOT, CLOSED };
struct conn { int fd, state; int tail_len; char tail[64]; long long at; };

static long long now_ns(void) { struct timespec t; clock_gettime(CLOCK_REALTIME, &t); return t.tv_sec * 1000000000LL + t.tv_nsec; }
static double mono(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

static struct conn *cs;
static int ep, n, opened, pending, ready, got, closed_early;
static struct sockaddr_in addr;
static char req[1024];
static int reqlen;
static const char *marker, *ready_mark;

static void open_one(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) { perror("socket"); exit(1); }
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0 && errno != EINPROGRESS) { perror("connect"); exit(1); }
    struct conn *c = &cs[opened];
    c->fd = fd; c->state = CONNECTING; c->tail_len = 0;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP, .data.u32 = opened};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    opened++; pending++;
}

/* Looks for `needle` in the tail kept from the last read plus `data`. */
static int seen(struct conn *c, const char *data, int len, const char *needle) {
    char buf[64 + 65536];
    memcpy(buf, c->tail, c->tail_len);
    memcpy(buf + c->tail_len, data, len);
    int total = c->tail_len + len;
    int found = memmem(buf, total, needle, strlen(needle)) != 0;
    int keep = total < 63 ? total : 63;
    memcpy(c->tail, buf + total - keep, keep);
    c->tail_len = keep;
    return found;
}

static void on_event(struct conn *c, unsigned events) {
    if (c->state == CONNECTING && (events & EPOLLOUT)) {
        if (write(c->fd, req, reqlen) != reqlen) { perror("write"); exit(1); }
        c->state = WAITING_FIRST;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = c - cs};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    }
    if (!(events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) return;
    char data[65536];
    for (;;) {
        ssize_t r = read(c->fd, data, sizeof data);
        if (r < 0 && errno == EAGAIN) return;
        if (r <= 0) {
            if (c->state != GOT) closed_early++;
            if (c->state == WAITING_FIRST || c->state == CONNECTING) pending--;
            c->state = CLOSED;
            close(c->fd);
            return;
        }
        if (c->state == WAITING_FIRST && seen(c, data, r, ready_mark)) {
            c->state = READY; ready++; pending--;
            c->tail_len = 0;
            if (seen(c, data, r, marker)) { c->state = GOT; c->at = now_ns(); got++; }
        } else if (c->state == READY && seen(c, data, r, marker)) {
            c->state = GOT; c->at = now_ns(); got++;
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 9) { fprintf(stderr, "usage: sseclient HOST PORT PATH N READY MARKER OUTFILE TIMEOUT_S\n"); return 2; }
    addr.sin_family = AF_INET; addr.sin_port = htons(atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &addr.sin_addr);
    n = atoi(argv[4]); ready_mark = argv[5]; marker = argv[6];
    double timeout = atof(argv[8]);
    reqlen = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s:%s\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n", argv[3], argv[1], argv[2]);
    cs = calloc(n, sizeof *cs);
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event evs[1024];
    double t0 = mono();
    while (ready + closed_early < n) {
        while (opened < n && pending < 256) open_one();
        int k = epoll_wait(ep, evs, 1024, 100);
        for (int i = 0; i < k; i++) on_event(&cs[evs[i].data.u32], evs[i].events);
        if (mono() - t0 > timeout) break;
    }
    printf("ready %d %.3f %d\n", ready, mono() - t0, closed_early);
    fflush(stdout);
    if (ready < n) return 1;
    t0 = mono();
    while (got + closed_early < n && mono() - t0 < timeout) {
        int k = epoll_wait(ep, evs, 1024, 100);
        for (int i = 0; i < k; i++) on_event(&cs[evs[i].data.u32], evs[i].events);
    }
    FILE *f = fopen(argv[7], "w");
    for (int i = 0; i < n; i++) if (cs[i].state == GOT) fprintf(f, "%lld\n", cs[i].at);
    fclose(f);
    printf("done %d %d\n", got, closed_early);
    fflush(stdout);
    return got == n ? 0 : 1;
}
