/* teerelay: the cheapest possible "upstairs", for ci/bench_ceiling.py.
 *
 * Usage: teerelay UNIX_PATH PORT [PORT...]
 *
 * Listens on UNIX_PATH; for each client it connects to 127.0.0.1:PORT for every PORT (with
 * TCP_NODELAY) and copies bytes: everything the client sends goes to every upstream, what the
 * first upstream sends goes back to the client, what the others send is read and dropped.
 * With NBD servers upstream this is replication with no protocol logic at all: no parsing, no
 * hashing, no job bookkeeping, one read() and N write()s per chunk. Whatever throughput it
 * reaches over loopback TCP is an upper bound for any upstairs that must move the same bytes
 * over the same sockets (Crucible's: one copy of a read, three of a write).
 *
 * One client at a time (qemu-img bench opens one connection); within it one thread per
 * direction and upstream with blocking I/O and 4 MiB socket buffers, so the copies overlap
 * as far as the two cores allow. Exits on a failed connect. An end of input is passed on
 * as a half-close; an error on any socket ends that client's relay.
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define CHUNK (1 << 20)
#define MAX_UP 8

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* A decimal port 1-65535, or 0 (with the reason on stderr). */
static int parse_port(const char *text) {
    char *end = NULL;
    errno = 0;
    long port = strtol(text, &end, 10);
    if (*text == '\0' || *end != '\0' || errno != 0 || port < 1 || port > 65535) {
        fprintf(stderr, "teerelay: '%s' is not a port (1-65535)\n", text);
        return 0;
    }
    return (int)port;
}

static int connect_port(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in in = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int one = 1, big = 4 << 20;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    if (connect(fd, (struct sockaddr *)&in, sizeof in) != 0) {
        perror("teerelay: connect");
        exit(1);
    }
    return fd;
}

struct pump {
    int from;
    int *to; /* NULL: read and drop */
    int n_to;
};

/* Copies `from` to every fd of `to` until `from` ends, then passes the end on (half-close,
 * so replies still flow the other way); on an error it shuts every socket it touches, which
 * ends the other pumps of this client too. Its own buffer, its own thread. */
static void *pump(void *arg) {
    struct pump *p = arg;
    char *buf = malloc(CHUNK);
    int how = SHUT_RDWR;
    while (buf != NULL) {
        ssize_t n = read(p->from, buf, CHUNK);
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0)
            how = SHUT_WR;
        if (n <= 0)
            break;
        int failed = 0;
        for (int i = 0; i < p->n_to && !failed; i++)
            failed = write_all(p->to[i], buf, (size_t)n) != 0;
        if (failed)
            break;
    }
    free(buf);
    if (how == SHUT_RDWR)
        shutdown(p->from, SHUT_RDWR);
    for (int i = 0; i < p->n_to; i++)
        shutdown(p->to[i], how);
    return NULL;
}

/* One thread per direction and upstream, so a slow socket never stalls the others: the
 * client's bytes fan out while the first upstream's replies flow back and the other
 * upstreams' replies are drained, all at once. */
static void relay(int client, int *up, int n_up) {
    pthread_t threads[MAX_UP + 1];
    struct pump pumps[MAX_UP + 1];
    pumps[0] = (struct pump){.from = client, .to = up, .n_to = n_up};
    for (int i = 0; i < n_up; i++)
        pumps[1 + i] = (struct pump){.from = up[i], .to = i == 0 ? &client : NULL, .n_to = i == 0 ? 1 : 0};
    for (int i = 0; i <= n_up; i++)
        pthread_create(&threads[i], NULL, pump, &pumps[i]);
    for (int i = 0; i <= n_up; i++)
        pthread_join(threads[i], NULL);
}

int main(int argc, char **argv) {
    if (argc < 3 || argc - 2 > MAX_UP) {
        fprintf(stderr, "usage: teerelay UNIX_PATH PORT [PORT...] (at most %d ports)\n", MAX_UP);
        return 2;
    }
    int n_up = argc - 2;
    int ports[MAX_UP];
    for (int i = 0; i < n_up; i++)
        if ((ports[i] = parse_port(argv[2 + i])) == 0)
            return 2;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(argv[1]) >= sizeof sa.sun_path) {
        fprintf(stderr, "teerelay: socket path longer than %zu bytes\n", sizeof sa.sun_path - 1);
        return 2;
    }
    struct stat st;
    if (lstat(argv[1], &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            fprintf(stderr, "teerelay: %s exists and is not a socket; not replacing it\n", argv[1]);
            return 2;
        }
        unlink(argv[1]); /* a socket left by an earlier relay */
    }
    strcpy(sa.sun_path, argv[1]);
    int listener = socket(AF_UNIX, SOCK_STREAM, 0);
    if (bind(listener, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(listener, 4) != 0) {
        perror("teerelay: listen");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN); /* a peer gone mid-write ends that client's relay, not the relay */
    for (;;) {
        int client = accept(listener, NULL, NULL);
        if (client < 0)
            continue;
        int up[MAX_UP];
        for (int i = 0; i < n_up; i++)
            up[i] = connect_port(ports[i]);
        relay(client, up, n_up);
        close(client);
        for (int i = 0; i < n_up; i++)
            close(up[i]);
    }
}
