/* A handler for the dispatch latency measure: the first thing it does is read
 * CLOCK_REALTIME, then it appends "<SPOOL_ID> <ns>\n" to $SPOOL_DIR/../stamps
 * (one write with O_APPEND, so lines never mix). Built static when it can be,
 * so that dynamic loading does not count as dispatch time. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int main(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    const char *dir = getenv("SPOOL_DIR"), *id = getenv("SPOOL_ID");
    if (!dir || !id) return 1;
    char path[4096], line[128];
    snprintf(path, sizeof path, "%s/../stamps", dir);
    int n = snprintf(line, sizeof line, "%s %lld\n", id, (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd < 0 || write(fd, line, n) != n) return 1;
    return close(fd) != 0;
}
