/*
 * sseload: the benchmark's load client. Opens N event-stream connections
 * to one URL on 127.0.0.1 from one epoll loop, and records, for every
 * event every subscriber gets, the moment it arrived (CLOCK_REALTIME, the
 * clock the renderer's "t_ns" comes from).
 *
 * It parses just enough: the status line and headers, the chunked framing,
 * and, in the body, each "t_ns":<digits> (which identifies the event; the
 * renderer prints a new one per event). Everything else is skipped.
 *
 * Protocol with the harness (bench/harness.py), on stdout, one line each:
 *   CONNECTED {"ok":..,"failed":..,"connect_s":..,...}   every stream has its
 *                                                      headers (or failed)
 *   DONE {...}                                         every stream ended (or
 *                                                      --timeout passed)
 * then it writes --out (binary: int64 K, int64 N, K t_ns, then K*N int64
 * receive times, 0 for "not received"), waits for a line or EOF on stdin,
 * closes every socket with a RST (SO_LINGER 0: no TIME_WAIT left behind)
 * and exits.
 *
 * usage: sseload --port P --path /renders/ID/events -n N --events K --out FILE
 *                [--concurrency C] [--connect-timeout S] [--timeout S]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

enum { S_IDLE, S_CONNECTING, S_HEADERS, S_BODY, S_DONE, S_FAILED };
enum { C_SIZE, C_EXT, C_DATA, C_DATA_END, C_LAST };

#define HDR_MAX 2048

typedef struct {
    int fd;
    uint8_t state;
    uint8_t chunked;
    uint8_t cstate;     /* chunked decoder state */
    uint8_t match;      /* bytes of "t_ns": matched so far */
    uint8_t cmatch;     /* bytes of "event: complete" matched so far */
    uint8_t innum;      /* reading the digits after "t_ns": */
    uint8_t complete;   /* saw "event: complete" */
    uint8_t sawcr;
    int64_t num;
    uint64_t chunkleft;
    uint32_t received;  /* t_ns events received */
    uint16_t hlen;
    char hdr[HDR_MAX];
} Conn;

static const char PAT[] = "\"t_ns\":";
static const int PATLEN = 7;
static const char CPAT[] = "event: complete";
static const int CPATLEN = 15;

static Conn *conns;
static int N, K, KMAX;
static int64_t *tns;     /* KMAX: the t_ns of each event index */
static int ktotal;       /* events seen so far */
static int64_t *recv_at; /* KMAX * N */
static int64_t now_ns_cached;
static long dup_events, extra_events, bad_status, conn_errors, eof_before_end, clean_end;
static long parse_errors;
static int64_t first_recv, last_recv;

static int64_t now_ns(int clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void record(int ci, int64_t t) {
    /* Find the event by its t_ns, newest first: nearly always the last one. */
    int k;
    for (k = ktotal - 1; k >= 0; k--)
        if (tns[k] == t) break;
    if (k < 0) {
        if (ktotal >= KMAX) {
            extra_events++;
            return;
        }
        k = ktotal++;
        tns[k] = t;
    }
    int64_t *slot = &recv_at[(size_t)k * N + ci];
    if (*slot) {
        dup_events++;
        return;
    }
    *slot = now_ns_cached;
    conns[ci].received++;
    if (!first_recv || now_ns_cached < first_recv) first_recv = now_ns_cached;
    if (now_ns_cached > last_recv) last_recv = now_ns_cached;
}

/* The decoded body of a stream: look for "t_ns":<digits> and "event: complete". */
static void scan(int ci, const char *p, size_t n) {
    Conn *c = &conns[ci];
    for (size_t i = 0; i < n; i++) {
        char ch = p[i];
        if (c->innum) {
            if (ch >= '0' && ch <= '9') {
                c->num = c->num * 10 + (ch - '0');
                c->innum = 2;
                continue;
            }
            if (ch == ' ' && c->innum == 1) continue; /* "t_ns": 123 */
            if (c->innum == 2) record(ci, c->num);
            c->innum = 0;
            c->num = 0;
        }
        if (ch == PAT[c->match]) {
            if (++c->match == PATLEN) {
                c->match = 0;
                c->innum = 1;
                c->num = 0;
                continue;
            }
        } else {
            c->match = (ch == '"') ? 1 : 0;
        }
        if (ch == CPAT[c->cmatch]) {
            if (++c->cmatch == CPATLEN) {
                c->complete = 1;
                c->cmatch = 0;
            }
        } else {
            c->cmatch = (ch == 'e') ? 1 : 0;
        }
    }
}

static void finish(int ci, int state) {
    Conn *c = &conns[ci];
    if (c->state == S_DONE || c->state == S_FAILED) return;
    c->state = state;
}

/* Body bytes: undo the chunked framing (or not), then scan. */
static void body(int ci, const char *p, size_t n) {
    Conn *c = &conns[ci];
    if (!c->chunked) {
        scan(ci, p, n);
        return;
    }
    size_t i = 0;
    while (i < n && c->state == S_BODY) {
        char ch = p[i];
        switch (c->cstate) {
        case C_SIZE:
            if (ch >= '0' && ch <= '9')
                c->chunkleft = c->chunkleft * 16 + (ch - '0');
            else if (ch >= 'a' && ch <= 'f')
                c->chunkleft = c->chunkleft * 16 + (ch - 'a' + 10);
            else if (ch >= 'A' && ch <= 'F')
                c->chunkleft = c->chunkleft * 16 + (ch - 'A' + 10);
            else if (ch == '\n')
                c->cstate = c->chunkleft ? C_DATA : C_LAST;
            else
                c->cstate = C_EXT;
            i++;
            if (c->cstate == C_LAST) {
                clean_end++;
                finish(ci, S_DONE);
                return;
            }
            break;
        case C_EXT:
            if (ch == '\n') {
                c->cstate = c->chunkleft ? C_DATA : C_LAST;
                if (c->cstate == C_LAST) {
                    clean_end++;
                    finish(ci, S_DONE);
                    return;
                }
            }
            i++;
            break;
        case C_DATA: {
            size_t take = n - i;
            if (take > c->chunkleft) take = c->chunkleft;
            scan(ci, p + i, take);
            i += take;
            c->chunkleft -= take;
            if (!c->chunkleft) c->cstate = C_DATA_END;
            break;
        }
        case C_DATA_END: /* the CRLF after the data */
            if (ch == '\n') {
                c->cstate = C_SIZE;
                c->chunkleft = 0;
            }
            i++;
            break;
        }
    }
}

static int headers(int ci, const char *p, size_t n, size_t *used) {
    /* Accumulate until the blank line; then check status and framing. */
    Conn *c = &conns[ci];
    size_t i;
    for (i = 0; i < n; i++) {
        if (c->hlen >= HDR_MAX - 1) return -1;
        c->hdr[c->hlen++] = p[i];
        if (c->hlen >= 4 && memcmp(c->hdr + c->hlen - 4, "\r\n\r\n", 4) == 0) {
            i++;
            break;
        }
    }
    *used = i;
    if (!(c->hlen >= 4 && memcmp(c->hdr + c->hlen - 4, "\r\n\r\n", 4) == 0)) return 0;
    c->hdr[c->hlen] = 0;
    if (strncmp(c->hdr, "HTTP/1.1 200", 12) != 0 && strncmp(c->hdr, "HTTP/1.0 200", 12) != 0) return -2;
    for (char *q = c->hdr; *q; q++) *q = (*q >= 'A' && *q <= 'Z') ? *q + 32 : *q;
    c->chunked = strstr(c->hdr, "transfer-encoding: chunked") != NULL;
    return 1;
}

int main(int argc, char **argv) {
    int port = 0, concurrency = 1000;
    const char *path = NULL, *out = NULL;
    double connect_timeout = 120, timeout = 300;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            fprintf(stderr, "sseload: %s needs a value\n", a);
            return 2;
        }
        if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--path")) path = v;
        else if (!strcmp(a, "-n")) N = atoi(v);
        else if (!strcmp(a, "--events")) K = atoi(v);
        else if (!strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--concurrency")) concurrency = atoi(v);
        else if (!strcmp(a, "--connect-timeout")) connect_timeout = atof(v);
        else if (!strcmp(a, "--timeout")) timeout = atof(v);
        else {
            fprintf(stderr, "sseload: unknown option %s\n", a);
            return 2;
        }
        i++;
    }
    if (!port || !path || N <= 0 || K <= 0 || !out || concurrency <= 0) {
        fprintf(stderr, "usage: sseload --port P --path PATH -n N --events K --out FILE "
                        "[--concurrency C] [--connect-timeout S] [--timeout S]\n");
        return 2;
    }
    KMAX = K + 16;

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rlim_t want = (rlim_t)N + 64;
    if (rl.rlim_cur < want) {
        rl.rlim_cur = rl.rlim_max < want ? rl.rlim_max : want;
        if (rl.rlim_max < want && rl.rlim_max != RLIM_INFINITY) {
            fprintf(stderr, "sseload: RLIMIT_NOFILE hard limit %lu < %lu\n", (unsigned long)rl.rlim_max,
                    (unsigned long)want);
            return 2;
        }
        rl.rlim_cur = want;
        if (setrlimit(RLIMIT_NOFILE, &rl)) die("setrlimit");
    }

    conns = calloc(N, sizeof(Conn));
    tns = calloc(KMAX, sizeof(int64_t));
    recv_at = calloc((size_t)KMAX * N, sizeof(int64_t));
    if (!conns || !tns || !recv_at) die("calloc");

    char request[1024];
    int reqlen = snprintf(request, sizeof request,
                          "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: text/event-stream\r\n"
                          "Cache-Control: no-cache\r\nUser-Agent: sseload\r\n\r\n",
                          path, port);

    struct sockaddr_in addr = {0};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    struct epoll_event evs[1024];
    static char buf[65536];

    int started = 0, inflight = 0, connected = 0, failed = 0, ended = 0;
    int64_t t0 = now_ns(CLOCK_MONOTONIC);
    int64_t t_connected = 0;
    int64_t connect_deadline = t0 + (int64_t)(connect_timeout * 1e9);
    double cpu_at_connected = 0;
    int connected_reported = 0;
    int64_t deadline = 0;
    int timed_out = 0;

    for (;;) {
        /* Keep up to `concurrency` connects in flight until N are started. */
        while (!connected_reported && started < N && inflight < concurrency) {
            int ci = started++;
            Conn *c = &conns[ci];
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (fd < 0) die("socket");
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            c->fd = fd;
            c->state = S_CONNECTING;
            inflight++;
            if (connect(fd, (struct sockaddr *)&addr, sizeof addr) && errno != EINPROGRESS) {
                conn_errors++;
                c->state = S_FAILED;
                failed++;
                inflight--;
                continue;
            }
            struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)ci};
            if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev)) die("epoll_ctl");
        }
        int64_t mono = now_ns(CLOCK_MONOTONIC);
        if (!connected_reported && (connected + failed >= N || mono > connect_deadline)) {
            connected_reported = 1;
            t_connected = mono;
            cpu_at_connected = cpu_seconds();
            printf("CONNECTED {\"ok\":%d,\"failed\":%d,\"connect_s\":%.6f,\"cpu_s\":%.6f,\"bad_status\":%ld,"
                   "\"conn_errors\":%ld}\n",
                   connected, N - connected, (mono - t0) / 1e9, cpu_at_connected, bad_status, conn_errors);
            fflush(stdout);
            deadline = mono + (int64_t)(timeout * 1e9);
        }
        if (connected_reported && (ended + failed >= N)) break;
        if (connected_reported && mono > deadline) {
            timed_out = 1;
            break;
        }
        int n = epoll_wait(ep, evs, 1024, 100);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int e = 0; e < n; e++) {
            int ci = (int)evs[e].data.u32;
            Conn *c = &conns[ci];
            if (c->state == S_CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || write(c->fd, request, reqlen) != reqlen) {
                    conn_errors++;
                    c->state = S_FAILED;
                    failed++;
                    inflight--;
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    continue;
                }
                c->state = S_HEADERS;
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)ci};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                continue;
            }
            if (c->state != S_HEADERS && c->state != S_BODY) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                continue;
            }
            ssize_t r = read(c->fd, buf, sizeof buf);
            now_ns_cached = now_ns(CLOCK_REALTIME);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (r <= 0) {
                int was = c->state;
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                if (was == S_HEADERS) {
                    conn_errors++;
                    inflight--;
                    c->state = S_FAILED;
                    failed++;
                } else {
                    /* A close-delimited body ends here; a chunked one should
                     * have ended with its last chunk. */
                    if (c->chunked) eof_before_end++;
                    else clean_end++;
                    c->state = S_DONE;
                    ended++;
                }
                continue;
            }
            size_t used = 0;
            if (c->state == S_HEADERS) {
                int h = headers(ci, buf, (size_t)r, &used);
                if (h < 0) {
                    if (h == -2) bad_status++;
                    else parse_errors++;
                    inflight--;
                    c->state = S_FAILED;
                    failed++;
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    continue;
                }
                if (h == 0) continue;
                inflight--;
                connected++;
                c->state = S_BODY;
                c->cstate = C_SIZE;
            }
            if ((size_t)r > used) body(ci, buf + used, (size_t)r - used);
            if (c->state == S_DONE) {
                ended++;
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            }
        }
    }

    int64_t t_done = now_ns(CLOCK_MONOTONIC);
    double cpu_done = cpu_seconds();
    long received = 0, completed = 0;
    for (int i = 0; i < N; i++) {
        received += conns[i].received;
        completed += conns[i].complete;
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("DONE {\"ok\":%d,\"ended\":%d,\"failed\":%d,\"timed_out\":%s,\"events_seen\":%d,\"received\":%ld,"
           "\"completed\":%ld,\"clean_end\":%ld,\"eof_before_end\":%ld,\"dup_events\":%ld,\"extra_events\":%ld,"
           "\"bad_status\":%ld,\"conn_errors\":%ld,\"parse_errors\":%ld,\"first_recv_ns\":%lld,"
           "\"last_recv_ns\":%lld,\"cpu_s\":%.6f,\"cpu_window_s\":%.6f,\"wall_window_s\":%.6f,"
           "\"max_rss_kib\":%ld}\n",
           connected, ended, failed, timed_out ? "true" : "false", ktotal, received, completed, clean_end,
           eof_before_end, dup_events, extra_events, bad_status, conn_errors, parse_errors,
           (long long)first_recv, (long long)last_recv, cpu_done, cpu_done - cpu_at_connected,
           (t_done - t_connected) / 1e9, ru.ru_maxrss);
    fflush(stdout);

    FILE *f = fopen(out, "wb");
    if (!f) die(out);
    int64_t head[2] = {ktotal, N};
    fwrite(head, sizeof head, 1, f);
    fwrite(tns, sizeof(int64_t), ktotal, f);
    fwrite(recv_at, sizeof(int64_t), (size_t)ktotal * N, f);
    if (fclose(f)) die(out);
    printf("WRITTEN\n");
    fflush(stdout);

    /* Hold the connections until the harness has read the server's CPU
     * time; then reset them all. */
    for (;;) {
        ssize_t r = read(0, buf, sizeof buf);
        if (r <= 0 || memchr(buf, '\n', (size_t)r)) break;
    }
    struct linger lg = {1, 0};
    for (int i = 0; i < started; i++) {
        if (conns[i].fd > 0) {
            setsockopt(conns[i].fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            close(conns[i].fd);
        }
    }
    return 0;
}
