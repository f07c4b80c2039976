/* pacer: a paced, open-loop HTTP/1.1 load generator for latency at a fixed request rate.
 *
 * Why: wrk is closed-loop (it cannot hold a rate), Debian 12 ships neither wrk2 nor vegeta nor
 * fortio, and hey prints latencies rounded to 0.1 ms (too coarse: the proxies differ by tens of
 * microseconds). This is the smallest honest tool: one thread, K keep-alive connections, request
 * i is *scheduled* at t0 + i/rate on connection i % K. If that connection is still busy the
 * request goes out late, and its latency is measured from its scheduled time (wrk2's correction
 * for coordinated omission); when it goes out late only because this process woke up late, its
 * latency counts from the actual send. The uncorrected latency (always from the actual send) is
 * reported too.
 *
 * usage: pacer HOST PORT PATH RATE SECONDS CONNECTIONS
 * prints one JSON line: {"requests":N,"errors":E,"achieved_rps":R,"latency_us":{...},
 *                        "uncorrected_us":{...}}
 * Responses must carry Content-Length or be chunked; any status other than 2xx counts as an error.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXC 256
#define BUFSZ 65536

typedef struct {
    int fd;
    int busy;
    int64_t sched, sent, free_at;
    char buf[BUFSZ];
    size_t len;
} conn_t;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int dial(const char *host, int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    inet_pton(AF_INET, host, &sa.sin_addr);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        perror("pacer: connect");
        exit(2);
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* returns bytes consumed by one complete response (status in *status), 0 if incomplete */
static size_t complete(const char *b, size_t n, int *status) {
    const char *end = memmem(b, n, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head = (size_t)(end - b) + 4;
    if (n < 12) return 0;
    *status = atoi(b + 9);
    const char *p = b;
    long clen = -1;
    int chunked = 0;
    while (p < end) {
        const char *eol = memmem(p, (size_t)(end + 2 - p), "\r\n", 2);
        if (!eol) break;
        if ((size_t)(eol - p) > 15 && strncasecmp(p, "content-length:", 15) == 0) clen = atol(p + 15);
        if ((size_t)(eol - p) > 18 && strncasecmp(p, "transfer-encoding:", 18) == 0 &&
            memmem(p, (size_t)(eol - p), "chunked", 7))
            chunked = 1;
        p = eol + 2;
    }
    if (clen >= 0) return n >= head + (size_t)clen ? head + (size_t)clen : 0;
    if (chunked) {
        const char *z = memmem(b + head, n - head, "0\r\n\r\n", 5);
        return z ? (size_t)(z - b) + 5 : 0;
    }
    return head; /* no body */
}

static void pct(const char *name, int64_t *v, long n, int comma) {
    qsort(v, (size_t)n, sizeof *v, cmp64);
    double sum = 0;
    for (long i = 0; i < n; i++) sum += (double)v[i];
#define P(q) (n ? (double)v[(long)((q) * (double)(n - 1) + 0.5)] / 1000.0 : 0.0)
    printf("\"%s\":{\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"p999\":%.1f,\"max\":%.1f,\"mean\":%.1f}%s",
           name, P(0.5), P(0.9), P(0.99), P(0.999), n ? (double)v[n - 1] / 1000.0 : 0.0,
           n ? sum / (double)n / 1000.0 : 0.0, comma ? "," : "");
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: pacer HOST PORT PATH RATE SECONDS CONNECTIONS\n");
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]);
    const char *path = argv[3];
    double rate = atof(argv[4]), secs = atof(argv[5]);
    int k = atoi(argv[6]);
    if (k < 1 || k > MAXC || rate <= 0 || secs <= 0) {
        fprintf(stderr, "pacer: bad arguments\n");
        return 2;
    }
    long total = (long)(rate * secs);
    int64_t interval = (int64_t)(1e9 / rate);
    int64_t *lat = calloc((size_t)total, sizeof *lat), *raw = calloc((size_t)total, sizeof *raw);
    conn_t *c = calloc((size_t)k, sizeof *c);
    char req[1024];
    int reqlen = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: pacer\r\n\r\n", path, host, port);
    for (int i = 0; i < k; i++) c[i].fd = dial(host, port);
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);

    long sent = 0, done = 0, errors = 0;
    static long codes[600];
    struct pollfd pfd[MAXC];
    int64_t t0 = now_ns() + 1000000;
    /* a server that cannot keep up would make the run last for ever: stop sending at twice the
     * planned duration (+5 s), wait for what is in flight, and say the run was truncated */
    int64_t hard_stop = t0 + (int64_t)(2 * secs * 1e9) + 5000000000LL;
    int truncated = 0;
    while (done < sent || (sent < total && !truncated)) {
        int64_t now = now_ns();
        if (!truncated && now > hard_stop) {
            truncated = 1;
            total = sent;
        }
        while (sent < total) {
            int64_t sched = t0 + sent * interval;
            if (sched > now) break;
            conn_t *cc = &c[sent % k];
            if (cc->busy) break; /* its connection is still busy: this request goes out late */
            if (write(cc->fd, req, (size_t)reqlen) != reqlen) {
                perror("pacer: write");
                return 3;
            }
            cc->busy = 1;
            cc->sent = now_ns();
            /* late because the connection was still busy (the server's fault): count from the
             * scheduled time; late only because this process woke up late: count from the send */
            cc->sched = cc->free_at > sched ? sched : cc->sent;
            sent++;
        }
        int64_t wait_ns = sent < total ? t0 + sent * interval - now_ns() : 1000000000LL;
        if (wait_ns < 0) wait_ns = 0;
        if (wait_ns < 30000) wait_ns = 0; /* spin for the last 30 us: poll's wakeups are late */
        else wait_ns -= 20000;             /* and wake a little early */
        for (int i = 0; i < k; i++) {
            pfd[i].fd = c[i].fd;
            pfd[i].events = POLLIN;
        }
        struct timespec ts = {wait_ns / 1000000000LL, wait_ns % 1000000000LL};
        int r = ppoll(pfd, (nfds_t)k, &ts, NULL);
        if (r < 0 && errno != EINTR) {
            perror("pacer: poll");
            return 3;
        }
        for (int i = 0; r > 0 && i < k; i++) {
            if (!(pfd[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            conn_t *cc = &c[i];
            ssize_t got = read(cc->fd, cc->buf + cc->len, BUFSZ - cc->len);
            if (got <= 0) {
                fprintf(stderr, "pacer: connection %d closed by the server after %ld responses\n", i, done);
                return 3;
            }
            cc->len += (size_t)got;
            int status = 0;
            size_t used = complete(cc->buf, cc->len, &status);
            if (used && cc->busy) {
                int64_t t = now_ns();
                lat[done] = t - cc->sched;
                raw[done] = t - cc->sent;
                done++;
                if (status < 200 || status > 299) errors++;
                codes[status > 0 && status < 600 ? status : 0]++;
                memmove(cc->buf, cc->buf + used, cc->len - used);
                cc->len -= used;
                cc->busy = 0;
                cc->free_at = t;
            }
        }
    }
    double elapsed = (double)(now_ns() - t0) / 1e9;
    printf("{\"requests\":%ld,\"errors\":%ld,\"target_rps\":%.1f,\"achieved_rps\":%.1f,\"connections\":%d,"
           "\"truncated\":%s,",
           done, errors, rate, (double)done / elapsed, k, truncated ? "true" : "false");
    pct("latency_us", lat, done, 1);
    pct("uncorrected_us", raw, done, 1);
    printf("\"status\":{");
    for (int i = 0, first = 1; i < 600; i++)
        if (codes[i]) {
            printf("%s\"%d\":%ld", first ? "" : ",", i, codes[i]);
            first = 0;
        }
    printf("}}\n");
    return 0;
}
