/* Writes N finished events straight into a spool's events/ directory, in the
 * spool format (docs/spool-format.md): events/<ULID>/event.json and
 * status.json with state "succeeded". For the scale measure, where making a
 * million events through HTTP would take far too long.
 *
 * usage: genspool EVENTS_DIR N FIRST_MS LAST_MS [SEED]
 * IDs are ULIDs whose times run evenly from FIRST_MS to LAST_MS (ms since the
 * epoch), so they sort in creation order as spoold's do. Each event finished
 * 2 ms after it was submitted. Prints one ID out of every 1,000 (a sample for
 * status polls). Not durable: run `sync` afterwards. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char CROCK[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

static void ulid(uint64_t ms, uint64_t r_hi16, uint64_t r_lo64, char out[27]) {
    unsigned __int128 v = ((unsigned __int128)ms << 80) | ((unsigned __int128)(r_hi16 & 0xffff) << 64) | r_lo64;
    for (int i = 25; i >= 0; i--) { out[i] = CROCK[(unsigned)(v & 31)]; v >>= 5; }
    out[26] = 0;
}

static void rfc3339(uint64_t ms, char out[32]) {
    time_t s = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&s, &tm);
    size_t n = strftime(out, 32, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + n, 32 - n, ".%03uZ", (unsigned)(ms % 1000));
}

static uint64_t rng;
static uint64_t next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

static void put(int dfd, const char *name, const char *buf, int len) {
    int fd = openat(dfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 || write(fd, buf, len) != len) { perror(name); exit(1); }
    close(fd);
}

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: genspool EVENTS_DIR N FIRST_MS LAST_MS [SEED]\n"); return 2; }
    long n = atol(argv[2]);
    uint64_t first = strtoull(argv[3], 0, 10), last = strtoull(argv[4], 0, 10);
    rng = argc > 5 ? strtoull(argv[5], 0, 10) : (uint64_t)time(0) * 2654435761u + getpid();
    if (!rng) rng = 88172645463325252ull;
    int evfd = open(argv[1], O_DIRECTORY | O_RDONLY);
    if (evfd < 0) { perror(argv[1]); return 1; }
    char id[27], sub[32], fin[32], buf[1024];
    for (long i = 0; i < n; i++) {
        uint64_t ms = first + (n > 1 ? (uint64_t)((last - first) * (double)i / (n - 1)) : 0);
        ulid(ms, next(), next(), id);
        rfc3339(ms, sub);
        rfc3339(ms + 2, fin);
        if (mkdirat(evfd, id, 0755) != 0) { perror(id); return 1; }
        int dfd = openat(evfd, id, O_DIRECTORY | O_RDONLY | O_CLOEXEC);
        if (dfd < 0) { perror(id); return 1; }
        int len = snprintf(buf, sizeof buf,
            "{\n  \"id\": \"%s\",\n  \"type\": \"noop\",\n  \"submitted_at\": \"%s\",\n"
            "  \"max_attempts\": 3,\n  \"timeout\": 300.0,\n  \"headers\": {\n"
            "    \"content-type\": \"application/json\"\n  },\n  \"payload\": {}\n}", id, sub);
        put(dfd, "event.json", buf, len);
        len = snprintf(buf, sizeof buf,
            "{\"id\":\"%s\",\"type\":\"noop\",\"state\":\"succeeded\",\"seq\":2,\"progress\":100.0,"
            "\"message\":null,\"data\":{},\"attempt\":1,\"max_attempts\":3,\"host\":\"vm\","
            "\"submitted_at\":\"%s\",\"started_at\":\"%s\",\"updated_at\":\"%s\",\"finished_at\":\"%s\","
            "\"exit_code\":0,\"error\":null,\"result\":null}", id, sub, sub, fin, fin);
        put(dfd, "status.json", buf, len);
        close(dfd);
        if (i % 1000 == 500) printf("%s\n", id);
    }
    return 0;
}
