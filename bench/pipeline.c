/* What the machine gives a large-file pull, with no FUSE and no daemon.
 *
 *   pipeline SRC_DIR PREFIX N DST_DIR [SENDER_NETNS ADDR]
 *
 * A forked sender and this process talk over loopback TCP; or, given a
 * network namespace (/run/netns/NAME) for the sender and this process's
 * address, between two test hosts: the sender enters that namespace and
 * connects to ADDR. For each file
 * SRC_DIR/<PREFIX><i> the receiver asks for it, the sender sendfile()s it,
 * the receiver recv()s it in 1 MiB reads and pwrite()s them into a temp
 * file in DST_DIR, renames that into place, then opens the result and reads
 * it to EOF like a consumer. That is the data path of a dyad-fs pull plus
 * the consumer's read, minus everything else: no checksum, no KVS, no
 * FUSE requests, no JavaScript. bench/transfer.ts prints the mount's (b)
 * beside it, so the ratio says how much of the machine's bandwidth the
 * mount leaves unused.
 *
 * Prints: count total_s bytes
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sched.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1 << 20)

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
  perror(what);
  exit(1);
}

/* The sender: one byte in asks for the next file, which goes out whole. */
static void serve(int sock, const char *dir, const char *prefix, int n) {
  char path[4096], req;
  for (int i = 0; i < n; i++) {
    if (read(sock, &req, 1) != 1) exit(1);
    snprintf(path, sizeof path, "%s/%s%d", dir, prefix, i);
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) die(path);
    off_t off = 0;
    while (off < st.st_size)
      if (sendfile(sock, fd, &off, st.st_size - off) <= 0) die("sendfile");
    close(fd);
  }
  exit(0);
}

int main(int argc, char **argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: pipeline SRC_DIR PREFIX N DST_DIR\n");
    return 2;
  }
  const char *src = argv[1], *prefix = argv[2], *dst = argv[4];
  const char *sender_ns = argc > 6 ? argv[5] : NULL;
  int n = atoi(argv[3]);
  int ls = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  if (sender_ns && inet_pton(AF_INET, argv[6], &addr.sin_addr) != 1) {
    fprintf(stderr, "pipeline: bad address %s\n", argv[6]);
    return 2;
  }
  socklen_t len = sizeof addr;
  if (ls < 0 || bind(ls, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(ls, 1) < 0 ||
      getsockname(ls, (struct sockaddr *)&addr, &len) < 0)
    die("listen");
  pid_t child = fork();
  if (child == 0) {
    if (sender_ns) {
      int ns = open(sender_ns, O_RDONLY | O_CLOEXEC);
      if (ns < 0 || setns(ns, CLONE_NEWNET) < 0) die(sender_ns);
      close(ns);
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
    serve(s, src, prefix, n);
  }
  int s = accept(ls, NULL, NULL);
  if (s < 0) die("accept");
  char *buf = malloc(CHUNK);
  char from[4096], tmp[4096], to[4096];
  long long bytes = 0;
  double start = now();
  for (int i = 0; i < n; i++) {
    struct stat st;
    snprintf(from, sizeof from, "%s/%s%d", src, prefix, i);
    if (stat(from, &st) < 0) die(from);
    snprintf(tmp, sizeof tmp, "%s/.%s%d.part", dst, prefix, i);
    snprintf(to, sizeof to, "%s/%s%d", dst, prefix, i);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) die(tmp);
    if (write(s, "g", 1) != 1) die("request");
    off_t got = 0;
    while (got < st.st_size) {
      off_t left = st.st_size - got;
      size_t want = left < CHUNK ? (size_t)left : CHUNK;
      /* Wake per ~1 MiB like the daemon's receive thread, never above what
         is left. Sleep in poll() and read without blocking, as it does: a
         blocking recv() that has copied part of its mark sleeps on, since
         the kernel's wake-up compares only the unread bytes with the mark. */
      int mark = (int)want;
      setsockopt(s, SOL_SOCKET, SO_RCVLOWAT, &mark, sizeof mark);
      struct pollfd p = {.fd = s, .events = POLLIN};
      if (poll(&p, 1, -1) < 0) die("poll");
      ssize_t r = recv(s, buf, want, MSG_DONTWAIT);
      if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      if (r <= 0) die("recv");
      for (ssize_t w = 0; w < r;) {
        ssize_t k = pwrite(fd, buf + w, (size_t)(r - w), got + w);
        if (k < 0) die("pwrite");
        w += k;
      }
      got += r;
    }
    if (close(fd) < 0 || rename(tmp, to) < 0) die(to);
    int rfd = open(to, O_RDONLY);
    if (rfd < 0) die(to);
    ssize_t r;
    while ((r = read(rfd, buf, CHUNK)) > 0) bytes += r;
    if (r < 0) die("read");
    close(rfd);
  }
  double total = now() - start;
  waitpid(child, NULL, 0);
  printf("%d %.6f %lld\n", n, total, bytes);
  return 0;
}
