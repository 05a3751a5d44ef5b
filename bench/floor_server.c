/*
 * floor_server: the benchmark's C floor. The same HTTP API as
 * bench/reference_starlette.py (and twistedsse), with as little work per
 * delivery as a server can do: each event is encoded once, into one
 * pre-framed HTTP/1.1 chunk ("<hex>\r\nid: N\nevent: progress\ndata: ...\n\n\r\n"),
 * and that one buffer is write()n to every subscriber's socket. Nothing
 * else happens per subscriber.
 *
 *   POST /renders              {"renderer": NAME, "params": {...}} -> 202 {id, events_url, ...}
 *   GET  /renders/ID           the job
 *   GET  /renders/ID/events    the stream: "retry:" first, then the history after
 *                              Last-Event-ID, then live "progress" events, then
 *                              "complete" (or "failed") and the last chunk
 *   GET  /renderers, /healthz
 *
 * What makes it a floor, not a server to copy:
 *   - One thread, one epoll loop (level-triggered), nonblocking sockets,
 *     TCP_NODELAY on every accepted socket; no access log, no keep-alive
 *     pings.
 *   - The renderer's stdout lines are passed through UNCHANGED as the
 *     data: field (no JSON parsing or re-serializing; only a line that does
 *     not start with '{' and end with '}' fails the render, as a non-object
 *     fails it in the reference).
 *   - The complete (or failed) event and the chunked terminator go out in
 *     one write. The connection then stays open, unused, until the client
 *     closes it (anything it sends after its request closes it too).
 *   - A subscriber whose socket is full is BUFFERED simply: what write()
 *     did not take is copied to a per-connection buffer, flushed on
 *     EPOLLOUT; later events append to it. One more than 1 MiB behind is
 *     dropped (closed), as the reference drops one 1000 events behind.
 *   - HTTP parsing is only what the harness sends: one request per
 *     connection, request line, Content-Length and Last-Event-ID, a body
 *     of at most 60 KiB. Answers other than the stream close the
 *     connection (Connection: close). The POST body's JSON is scanned for
 *     its top-level "renderer" (a string) and "params" (an object, handed
 *     to the renderer verbatim).
 *   - The renderer is "/bin/sh -c COMMAND" (posix_spawn; the benchmark's
 *     commands are the operator's own), params + "\n" on its stdin (fits
 *     the pipe: written at once, then closed), stdout read in the same
 *     loop, its exit seen through a pidfd. Jobs live in memory.
 *
 * usage: floor_server --port P --renderer NAME=COMMAND [--host H] [--backlog B]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define REQ_MAX (68 * 1024)  /* headers + body */
#define BODY_MAX (60 * 1024) /* params must fit the renderer's stdin pipe */
#define LINE_MAX_ (64 * 1024)
#define PENDING_MAX (1024 * 1024)
#define RETRY_MS 2000
#define MAX_RENDERERS 32

enum { K_LISTEN, K_CONN, K_STDOUT, K_PIDFD };
enum { S_REQUEST, S_REPLY, S_STREAM, S_ENDED };

typedef struct Job Job;

typedef struct {
    int kind; /* K_CONN */
    int fd;
    int state;
    int closed; /* freed after this epoll_wait batch */
    void *next_dead;
    int close_after_flush;
    Job *job;
    int sub_index; /* in job->subs, or -1 */
    char *req;
    size_t req_len;
    char *pending; /* what write() did not take */
    size_t pending_len, pending_cap;
} Conn;

typedef struct {
    char *buf; /* one pre-framed chunk */
    size_t len;
} Frame;

typedef struct {
    int kind; /* K_STDOUT or K_PIDFD */
    Job *job;
} Watch;

struct Job {
    char id[33];
    int renderer;
    const char *state;
    double created;
    struct timespec started;
    char *progress; /* the last line, verbatim */
    Frame *history;
    size_t nhistory, caphistory;
    int terminal;
    Conn **subs;
    size_t nsubs, capsubs;
    pid_t pid;
    int out_fd, pid_fd;
    Watch out_watch, pid_watch;
    char *line;
    size_t line_len;
    int out_eof, exited, exit_code;
    char problem[320];
};

static int ep;
static int listen_kind = K_LISTEN;
static char *renderer_names[MAX_RENDERERS], *renderer_commands[MAX_RENDERERS];
static int nrenderers;
static Job **jobs;
static size_t njobs, capjobs;
static void *dead; /* Conns closed during this batch of events */

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void *xrealloc(void *p, size_t n) {
    p = realloc(p, n);
    if (!p) die("realloc");
    return p;
}

/* -- output to a connection ------------------------------------------------ */

static void conn_close(Conn *c);

static void want_out(Conn *c, int on) {
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | (on ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Write, or buffer what the socket does not take. 0, or -1 if the
 * connection was closed. */
static int conn_send(Conn *c, const char *p, size_t n) {
    if (c->pending_len == 0) {
        ssize_t w = write(c->fd, p, n);
        if (w == (ssize_t)n) return 0;
        if (w < 0) {
            if (errno != EAGAIN && errno != EINTR) {
                conn_close(c);
                return -1;
            }
            w = 0;
        }
        p += w;
        n -= (size_t)w;
        want_out(c, 1);
    }
    if (c->pending_len + n > PENDING_MAX) { /* too far behind: dropped */
        conn_close(c);
        return -1;
    }
    if (c->pending_len + n > c->pending_cap) {
        c->pending_cap = (c->pending_len + n) * 2;
        c->pending = xrealloc(c->pending, c->pending_cap);
    }
    memcpy(c->pending + c->pending_len, p, n);
    c->pending_len += n;
    return 0;
}

static void conn_flush(Conn *c) {
    while (c->pending_len) {
        ssize_t w = write(c->fd, c->pending, c->pending_len);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            conn_close(c);
            return;
        }
        memmove(c->pending, c->pending + w, c->pending_len - (size_t)w);
        c->pending_len -= (size_t)w;
    }
    free(c->pending);
    c->pending = NULL;
    c->pending_cap = 0;
    if (c->close_after_flush) {
        conn_close(c);
        return;
    }
    want_out(c, 0);
}

static void unsubscribe(Conn *c) {
    Job *j = c->job;
    if (!j || c->sub_index < 0) return;
    Conn *last = j->subs[--j->nsubs];
    j->subs[c->sub_index] = last;
    last->sub_index = c->sub_index;
    c->sub_index = -1;
}

/* Freed only after the current batch of events, which may still name it. */
static void conn_close(Conn *c) {
    if (c->closed) return;
    unsubscribe(c);
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->req);
    free(c->pending);
    c->req = c->pending = NULL;
    c->pending_len = 0;
    c->closed = 1;
    c->next_dead = dead;
    dead = c;
}

/* A whole response, then close. */
static void reply(Conn *c, int status, const char *reason, const char *extra, const char *fmt, ...) {
    char body[8192], out[9216];
    va_list ap;
    va_start(ap, fmt);
    int blen = vsnprintf(body, sizeof body, fmt, ap);
    va_end(ap);
    if (blen < 0 || blen >= (int)sizeof body) blen = 0;
    int n = snprintf(out, sizeof out,
                     "HTTP/1.1 %d %s\r\n%sContent-Type: application/json\r\nContent-Length: %d\r\n"
                     "Connection: close\r\n\r\n%.*s",
                     status, reason, extra ? extra : "", blen, blen, body);
    c->state = S_REPLY;
    c->close_after_flush = 1;
    free(c->req);
    c->req = NULL;
    if (conn_send(c, out, (size_t)n) == 0 && c->pending_len == 0) conn_close(c);
}

static void error_reply(Conn *c, int status, const char *reason, const char *code, const char *detail) {
    reply(c, status, reason, NULL, "{\"error\":\"%s\",\"detail\":\"%s\"}", code, detail);
}

/* -- jobs and events --------------------------------------------------------- */

static double now_s(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static Job *find_job(const char *id, size_t len) {
    for (size_t i = 0; i < njobs; i++)
        if (strlen(jobs[i]->id) == len && memcmp(jobs[i]->id, id, len) == 0) return jobs[i];
    return NULL;
}

static int is_terminal(const char *name) {
    return !strcmp(name, "complete") || !strcmp(name, "failed") || !strcmp(name, "cancelled");
}

/* Encode once, keep for late subscribers, write to every subscriber. */
static void publish(Job *j, const char *name, const char *data, size_t dlen) {
    int terminal = is_terminal(name);
    char head[96];
    int hlen = snprintf(head, sizeof head, "id: %zu\nevent: %s\ndata: ", j->nhistory + 1, name);
    size_t payload = (size_t)hlen + dlen + 2;
    size_t cap = payload + 32;
    char *buf = malloc(cap);
    if (!buf) die("malloc");
    int sz = sprintf(buf, "%zx\r\n", payload);
    memcpy(buf + sz, head, (size_t)hlen);
    memcpy(buf + sz + hlen, data, dlen);
    size_t len = (size_t)sz + payload - 2;
    memcpy(buf + len, "\n\n\r\n", 4);
    len += 4;
    if (terminal) {
        memcpy(buf + len, "0\r\n\r\n", 5);
        len += 5;
    }
    if (j->nhistory == j->caphistory) {
        j->caphistory = j->caphistory ? j->caphistory * 2 : 64;
        j->history = xrealloc(j->history, j->caphistory * sizeof(Frame));
    }
    j->history[j->nhistory++] = (Frame){buf, len};
    /* Backwards: conn_send may close (and swap-remove) the current one. */
    for (size_t i = j->nsubs; i-- > 0;) {
        Conn *c = j->subs[i];
        if (conn_send(c, buf, len) == 0 && terminal) c->state = S_ENDED;
    }
    if (terminal) {
        j->terminal = 1;
        for (size_t i = 0; i < j->nsubs; i++) j->subs[i]->sub_index = -1;
        j->nsubs = 0;
    }
}

static void finish_job(Job *j) {
    char data[512];
    int n;
    if (!j->problem[0] && j->exit_code == 0) {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        double elapsed = (t.tv_sec - j->started.tv_sec) + (t.tv_nsec - j->started.tv_nsec) / 1e9;
        j->state = "succeeded";
        n = snprintf(data, sizeof data, "{\"output_url\":\"/renders/%s/output\",\"elapsed\":%.9g}", j->id, elapsed);
        publish(j, "complete", data, (size_t)n);
    } else {
        char message[360];
        if (j->problem[0]) snprintf(message, sizeof message, "%s", j->problem);
        else snprintf(message, sizeof message, "exit code %d", j->exit_code);
        j->state = "failed";
        n = snprintf(data, sizeof data, "{\"message\":\"%s\",\"exit_code\":%d}", message, j->exit_code);
        publish(j, "failed", data, (size_t)n);
    }
}

static void maybe_finish(Job *j) {
    if (j->out_eof && j->exited && !j->terminal) finish_job(j);
}

static void renderer_line(Job *j, char *line, size_t n) {
    while (n && (line[n - 1] == '\r' || line[n - 1] == ' ' || line[n - 1] == '\t')) n--;
    while (n && (*line == ' ' || *line == '\t')) line++, n--;
    if (!n || j->problem[0]) return;
    if (line[0] != '{' || line[n - 1] != '}') {
        /* No quotes or backslashes in the message: it goes into JSON as is. */
        snprintf(j->problem, sizeof j->problem, "stdout line is not a JSON object (%zu bytes)", n);
        kill(j->pid, SIGKILL);
        return;
    }
    free(j->progress);
    j->progress = strndup(line, n);
    publish(j, "progress", line, n);
}

static void renderer_readable(Job *j) {
    for (;;) {
        if (j->line_len == LINE_MAX_) {
            if (!j->problem[0]) {
                snprintf(j->problem, sizeof j->problem, "stdout line longer than %d bytes", LINE_MAX_);
                kill(j->pid, SIGKILL);
            }
            j->line_len = 0;
        }
        ssize_t r = read(j->out_fd, j->line + j->line_len, LINE_MAX_ - j->line_len);
        if (r < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            r = 0;
        }
        if (r == 0) {
            if (j->line_len) renderer_line(j, j->line, j->line_len);
            j->line_len = 0;
            epoll_ctl(ep, EPOLL_CTL_DEL, j->out_fd, NULL);
            close(j->out_fd);
            j->out_fd = -1;
            j->out_eof = 1;
            maybe_finish(j);
            return;
        }
        size_t start = 0, end = j->line_len + (size_t)r;
        for (size_t i = j->line_len; i < end; i++) {
            if (j->line[i] == '\n') {
                renderer_line(j, j->line + start, i - start);
                start = i + 1;
            }
        }
        memmove(j->line, j->line + start, end - start);
        j->line_len = end - start;
    }
}

static void renderer_exited(Job *j) {
    int status;
    if (waitpid(j->pid, &status, WNOHANG) != j->pid) return;
    j->exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
    epoll_ctl(ep, EPOLL_CTL_DEL, j->pid_fd, NULL);
    close(j->pid_fd);
    j->pid_fd = -1;
    j->exited = 1;
    maybe_finish(j);
}

static int start_renderer(Job *j, const char *params, size_t plen) {
    int in[2], out[2];
    if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC)) return -1;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    sigset_t dfl;
    sigemptyset(&dfl);
    sigaddset(&dfl, SIGPIPE); /* ignored here, default in the renderer */
    posix_spawnattr_setsigdefault(&attr, &dfl);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF);
    char *argv[] = {"sh", "-c", renderer_commands[j->renderer], NULL};
    int rc = posix_spawn(&j->pid, "/bin/sh", &fa, &attr, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    close(in[0]);
    close(out[1]);
    if (rc) {
        close(in[1]);
        close(out[0]);
        errno = rc;
        return -1;
    }
    /* At most BODY_MAX + 1 bytes: the pipe (64 KiB) takes them at once. */
    if (write(in[1], params, plen) < 0 || write(in[1], "\n", 1) < 0) { /* the renderer's problem */
    }
    close(in[1]);
    fcntl(out[0], F_SETFL, O_NONBLOCK);
    j->out_fd = out[0];
    j->line = malloc(LINE_MAX_);
    if (!j->line) die("malloc");
    j->out_watch = (Watch){K_STDOUT, j};
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &j->out_watch};
    epoll_ctl(ep, EPOLL_CTL_ADD, j->out_fd, &ev);
    j->pid_fd = (int)syscall(SYS_pidfd_open, j->pid, 0);
    if (j->pid_fd < 0) die("pidfd_open");
    j->pid_watch = (Watch){K_PIDFD, j};
    ev = (struct epoll_event){.events = EPOLLIN, .data.ptr = &j->pid_watch};
    epoll_ctl(ep, EPOLL_CTL_ADD, j->pid_fd, &ev);
    return 0;
}

/* -- the smallest JSON scanner that finds the body's two keys ----------------- */

static const char *skip_ws(const char *p, const char *e) {
    while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

/* The end of the JSON value at p, or NULL if it is not one. */
static const char *skip_value(const char *p, const char *e, int depth) {
    p = skip_ws(p, e);
    if (p >= e || depth > 64) return NULL;
    if (*p == '"') {
        for (p++; p < e; p++) {
            if (*p == '\\') p++;
            else if (*p == '"') return p + 1;
            else if ((unsigned char)*p < 0x20) return NULL;
        }
        return NULL;
    }
    if (*p == '{' || *p == '[') {
        char close = *p == '{' ? '}' : ']';
        p = skip_ws(p + 1, e);
        if (p < e && *p == close) return p + 1;
        for (;;) {
            if (close == '}') {
                if (p >= e || *p != '"') return NULL;
                if (!(p = skip_value(p, e, depth + 1))) return NULL;
                p = skip_ws(p, e);
                if (p >= e || *p != ':') return NULL;
                p++;
            }
            if (!(p = skip_value(p, e, depth + 1))) return NULL;
            p = skip_ws(p, e);
            if (p < e && *p == ',') {
                p = skip_ws(p + 1, e);
                continue;
            }
            if (p < e && *p == close) return p + 1;
            return NULL;
        }
    }
    const char *s = p;
    while (p < e && (strchr("+-.eE", *p) || (*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'z'))) p++;
    if (p == s) return NULL;
    size_t n = (size_t)(p - s);
    if ((n == 4 && !memcmp(s, "true", 4)) || (n == 4 && !memcmp(s, "null", 4)) || (n == 5 && !memcmp(s, "false", 5)))
        return p;
    char *end;
    char tmp[64];
    if (n >= sizeof tmp) return NULL;
    memcpy(tmp, s, n);
    tmp[n] = 0;
    strtod(tmp, &end);
    return *end ? NULL : p;
}

static void create_render(Conn *c, const char *body, size_t blen) {
    const char *e = body + blen, *p = skip_ws(body, e);
    const char *end = skip_value(p, e, 0);
    if (!end || skip_ws(end, e) != e) {
        error_reply(c, 400, "Bad Request", "malformed_json", "the body is not JSON");
        return;
    }
    if (*p != '{') {
        error_reply(c, 422, "Unprocessable Entity", "invalid_body", "expected {renderer, params}");
        return;
    }
    const char *name = NULL, *params = "{}";
    size_t name_len = 0, params_len = 2;
    int name_ok = 0;
    p = skip_ws(p + 1, e);
    while (p < e && *p == '"') {
        const char *k = p + 1, *kend = skip_value(p, e, 1);
        size_t klen = (size_t)(kend - 1 - k);
        const char *v = skip_ws(skip_ws(kend, e) + 1, e), *vend = skip_value(v, e, 1);
        if (klen == 8 && !memcmp(k, "renderer", 8)) {
            name_ok = *v == '"' && !memchr(v + 1, '\\', (size_t)(vend - 1 - (v + 1)));
            name = v + 1;
            name_len = (size_t)(vend - 1 - name);
        } else if (klen == 6 && !memcmp(k, "params", 6)) {
            if (*v != '{') { /* null too, as the reference */
                error_reply(c, 422, "Unprocessable Entity", "invalid_body", "expected {renderer, params}");
                return;
            } else {
                params = v;
                params_len = (size_t)(vend - v);
            }
        }
        p = skip_ws(vend, e);
        if (p < e && *p == ',') p = skip_ws(p + 1, e);
    }
    int r = -1;
    for (int i = 0; name_ok && i < nrenderers; i++)
        if (strlen(renderer_names[i]) == name_len && !memcmp(renderer_names[i], name, name_len)) r = i;
    if (r < 0) {
        error_reply(c, 422, "Unprocessable Entity", "unknown_renderer", "no such renderer");
        return;
    }
    Job *j = calloc(1, sizeof *j);
    if (!j) die("calloc");
    unsigned char raw[24];
    if (getrandom(raw, sizeof raw, 0) != (ssize_t)sizeof raw) die("getrandom");
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    for (int i = 0; i < 8; i++) { /* 24 bytes -> 32 base64url characters */
        uint32_t v = (uint32_t)raw[3 * i] << 16 | (uint32_t)raw[3 * i + 1] << 8 | raw[3 * i + 2];
        for (int k = 0; k < 4; k++) j->id[4 * i + k] = b64[(v >> (18 - 6 * k)) & 63];
    }
    j->renderer = r;
    j->state = "running";
    j->created = now_s(CLOCK_REALTIME);
    j->out_fd = j->pid_fd = -1;
    clock_gettime(CLOCK_MONOTONIC, &j->started);
    if (start_renderer(j, params, params_len)) {
        snprintf(j->problem, sizeof j->problem, "cannot start the renderer (errno %d)", errno);
        j->out_eof = j->exited = 1;
        j->exit_code = -1;
    }
    if (njobs == capjobs) {
        capjobs = capjobs ? capjobs * 2 : 16;
        jobs = xrealloc(jobs, capjobs * sizeof(Job *));
    }
    jobs[njobs++] = j;
    maybe_finish(j);
    char location[128];
    snprintf(location, sizeof location, "Location: /renders/%s\r\n", j->id);
    reply(c, 202, "Accepted", location,
          "{\"id\":\"%s\",\"renderer\":\"%s\",\"state\":\"%s\",\"progress\":null,\"created_at\":%.6f,"
          "\"status_url\":\"/renders/%s\",\"events_url\":\"/renders/%s/events\",\"output_url\":\"/renders/%s/output\"}",
          j->id, renderer_names[r], j->state, j->created, j->id, j->id, j->id);
}

static void describe(Conn *c, Job *j) {
    reply(c, 200, "OK", NULL,
          "{\"id\":\"%s\",\"renderer\":\"%s\",\"state\":\"%s\",\"progress\":%s,\"created_at\":%.6f,"
          "\"status_url\":\"/renders/%s\",\"events_url\":\"/renders/%s/events\",\"output_url\":\"/renders/%s/output\"}",
          j->id, renderer_names[j->renderer], j->state,
          j->progress && strlen(j->progress) < 4096 ? j->progress : "null", j->created, j->id, j->id, j->id);
}

static void subscribe(Conn *c, Job *j, const char *headers) {
    size_t after = 0;
    const char *h = strcasestr(headers, "\r\nlast-event-id:");
    if (h) {
        h += 16;
        while (*h == ' ' || *h == '\t') h++;
        size_t digits = strspn(h, "0123456789");
        if (digits && digits < 18 && (h[digits] == '\r' || h[digits] == ' ')) after = strtoull(h, NULL, 10);
    }
    if (j->terminal && after >= j->nhistory) {
        c->state = S_REPLY;
        c->close_after_flush = 1;
        static const char no[] = "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n";
        if (conn_send(c, no, sizeof no - 1) == 0 && c->pending_len == 0) conn_close(c);
        return;
    }
    free(c->req);
    c->req = NULL;
    c->state = S_STREAM;
    c->job = j;
    c->sub_index = -1;
    char head[512];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-store\r\n"
                     "Connection: keep-alive\r\nX-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\n\r\n"
                     "%x\r\nretry: %d\n\n\r\n",
                     (unsigned)snprintf(NULL, 0, "retry: %d\n\n", RETRY_MS), RETRY_MS);
    if (conn_send(c, head, (size_t)n)) return;
    for (size_t i = after; i < j->nhistory; i++)
        if (conn_send(c, j->history[i].buf, j->history[i].len)) return;
    if (j->terminal) {
        c->state = S_ENDED;
        return;
    }
    if (j->nsubs == j->capsubs) {
        j->capsubs = j->capsubs ? j->capsubs * 2 : 1024;
        j->subs = xrealloc(j->subs, j->capsubs * sizeof(Conn *));
    }
    c->sub_index = (int)j->nsubs;
    j->subs[j->nsubs++] = c;
}

/* -- requests ----------------------------------------------------------------- */

static void handle_request(Conn *c, size_t head_len) {
    char *r = c->req;
    char *sp1 = memchr(r, ' ', head_len);
    char *sp2 = sp1 ? memchr(sp1 + 1, ' ', head_len - (size_t)(sp1 + 1 - r)) : NULL;
    if (!sp1 || !sp2) {
        error_reply(c, 400, "Bad Request", "bad_request", "no request line");
        return;
    }
    size_t mlen = (size_t)(sp1 - r);
    const char *path = sp1 + 1;
    size_t plen = (size_t)(sp2 - path);
    const char *q = memchr(path, '?', plen);
    if (q) plen = (size_t)(q - path);
    int get = mlen == 3 && !memcmp(r, "GET", 3), post = mlen == 4 && !memcmp(r, "POST", 4);
#define PATH_IS(s) (plen == sizeof(s) - 1 && !memcmp(path, s, plen))
    if (post && PATH_IS("/renders")) {
        create_render(c, r + head_len, c->req_len - head_len);
    } else if (get && PATH_IS("/renderers")) {
        char list[2048];
        size_t n = 0;
        for (int i = 0; i < nrenderers && n < sizeof list - 80; i++)
            n += (size_t)snprintf(list + n, sizeof list - n, "%s{\"name\":\"%s\"}", i ? "," : "", renderer_names[i]);
        list[n] = 0;
        reply(c, 200, "OK", NULL, "{\"renderers\":[%s]}", list);
    } else if (get && PATH_IS("/healthz")) {
        size_t subs = 0;
        for (size_t i = 0; i < njobs; i++) subs += jobs[i]->nsubs;
        reply(c, 200, "OK", NULL, "{\"status\":\"ok\",\"renders\":%zu,\"subscribers\":%zu}", njobs, subs);
    } else if (get && plen > 9 && !memcmp(path, "/renders/", 9)) {
        const char *id = path + 9;
        size_t idlen = plen - 9;
        int events = idlen > 7 && !memcmp(id + idlen - 7, "/events", 7);
        if (events) idlen -= 7;
        Job *j = memchr(id, '/', idlen) ? NULL : find_job(id, idlen);
        if (!j) error_reply(c, 404, "Not Found", "unknown_job", "no such render");
        else if (events) {
            r[head_len - 2] = 0; /* the headers, as one string ending in \r\n */
            subscribe(c, j, r + (sp2 - r));
        } else describe(c, j);
    } else if (get || post) {
        error_reply(c, 404, "Not Found", "not_found", "no such resource");
    } else {
        error_reply(c, 405, "Method Not Allowed", "method_not_allowed", "GET or POST");
    }
#undef PATH_IS
}

static void conn_readable(Conn *c) {
    if (c->state != S_REQUEST) { /* a stream's client says something or goes */
        char buf[512];
        ssize_t r = read(c->fd, buf, sizeof buf);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        conn_close(c);
        return;
    }
    /* Read into a shared buffer; keep only what arrived (a few hundred
     * bytes), so that nothing per connection outlives its request. */
    static char rbuf[REQ_MAX];
    ssize_t r = read(c->fd, rbuf, REQ_MAX - c->req_len);
    if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (r <= 0) {
        conn_close(c);
        return;
    }
    c->req = xrealloc(c->req, c->req_len + (size_t)r + 1);
    memcpy(c->req + c->req_len, rbuf, (size_t)r);
    c->req_len += (size_t)r;
    c->req[c->req_len] = 0;
    char *end = strstr(c->req, "\r\n\r\n");
    if (!end) {
        if (c->req_len == REQ_MAX) error_reply(c, 431, "Request Header Fields Too Large", "too_large", "headers");
        return;
    }
    size_t head_len = (size_t)(end + 4 - c->req);
    size_t body_len = 0;
    end[2] = 0; /* for strcasestr; restored below */
    const char *cl = strcasestr(c->req, "\r\ncontent-length:");
    if (cl) body_len = strtoul(cl + 17, NULL, 10);
    end[2] = '\r';
    if (body_len > BODY_MAX) {
        error_reply(c, 413, "Content Too Large", "body_too_large", "at most 60 KiB");
        return;
    }
    if (c->req_len < head_len + body_len) return;
    c->req_len = head_len + body_len;
    c->req[c->req_len] = 0;
    handle_request(c, head_len);
}

static void accept_all(int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) perror("accept4");
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        Conn *c = calloc(1, sizeof *c);
        if (!c) die("calloc");
        c->kind = K_CONN;
        c->fd = fd;
        c->state = S_REQUEST;
        c->sub_index = -1;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev)) die("epoll_ctl");
    }
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 8000, backlog = 2048;
    for (int i = 1; i < argc; i++) {
        char *a = argv[i], *v = NULL, *eq = strchr(a, '=');
        if (!strncmp(a, "--", 2) && eq) { /* --flag=value */
            a = strndup(a, (size_t)(eq - a));
            v = eq + 1;
        } else if (i + 1 < argc) {
            v = argv[++i];
        }
        if (!v) {
            fprintf(stderr, "floor_server: %s needs a value\n", a);
            return 2;
        }
        if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--backlog")) backlog = atoi(v);
        else if (!strcmp(a, "--renderer")) {
            char *sep = strchr(v, '=');
            if (!sep || nrenderers == MAX_RENDERERS) {
                fprintf(stderr, "floor_server: --renderer NAME=COMMAND\n");
                return 2;
            }
            renderer_names[nrenderers] = strndup(v, (size_t)(sep - v));
            renderer_commands[nrenderers++] = sep + 1;
        } else {
            fprintf(stderr, "usage: floor_server --port P --renderer NAME=COMMAND [--host H] [--backlog B]\n");
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0) die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "floor_server: --host must be an IPv4 address\n");
        return 2;
    }
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr)) die("bind");
    if (listen(lfd, backlog)) die("listen");
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = &listen_kind};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev)) die("epoll_ctl");
    printf("floor_server listening on %s:%d\n", host, port);
    fflush(stdout);

    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int kind = *(int *)evs[i].data.ptr;
            if (kind == K_CONN && ((Conn *)evs[i].data.ptr)->closed) continue;
            if (kind == K_LISTEN) {
                accept_all(lfd);
            } else if (kind == K_STDOUT) {
                renderer_readable(((Watch *)evs[i].data.ptr)->job);
            } else if (kind == K_PIDFD) {
                renderer_exited(((Watch *)evs[i].data.ptr)->job);
            } else {
                Conn *c = evs[i].data.ptr;
                if (evs[i].events & EPOLLOUT) {
                    conn_flush(c);
                    continue; /* it may be closed now; EPOLLIN comes again */
                }
                conn_readable(c);
            }
        }
        while (dead) {
            Conn *c = dead;
            dead = c->next_dead;
            free(c);
        }
    }
}
