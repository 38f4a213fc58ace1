/* Per-file latency of plain POSIX I/O on N files DIR/<prefix><i>:
 *   files read  DIR PREFIX N        open + read to EOF + close
 *   files write DIR PREFIX N SIZE   open(O_CREAT|O_TRUNC) + write + close
 * Prints: count total_s median_us p99_us mean_us bytes
 * FILES_EXTRA_FDS=N: hold N more descriptors (of /dev/null) throughout, as
 * a process of a large parallel program does; a publishing close() on a
 * mount looks at each of the closer's descriptors.
 * Used by bench/transfer.ts, so the figures are those of an unmodified
 * program, with no Node in the measured path. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: files read|write DIR PREFIX N [SIZE]\n");
    return 2;
  }
  int writing = strcmp(argv[1], "write") == 0;
  const char *extra = getenv("FILES_EXTRA_FDS");
  for (int i = 0, k = extra ? atoi(extra) : 0; i < k; i++) {
    if (open("/dev/null", O_RDONLY) < 0) {
      perror("/dev/null");
      return 1;
    }
  }
  int n = atoi(argv[4]);
  size_t size = argc > 5 ? strtoull(argv[5], NULL, 10) : 0;
  size_t bufsize = 1 << 20;
  char *buf = malloc(bufsize);
  memset(buf, 'd', bufsize);
  double *lat = malloc(sizeof(double) * n);
  char path[4096];
  long long bytes = 0;
  double start = now();
  for (int i = 0; i < n; i++) {
    snprintf(path, sizeof path, "%s/%s%d", argv[2], argv[3], i);
    double t0 = now();
    int fd = writing ? open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644) : open(path, O_RDONLY);
    if (fd < 0) {
      perror(path);
      return 1;
    }
    if (writing) {
      size_t left = size;
      while (left > 0) {
        ssize_t w = write(fd, buf, left < bufsize ? left : bufsize);
        if (w <= 0) {
          perror("write");
          return 1;
        }
        left -= (size_t)w;
        bytes += w;
      }
    } else {
      ssize_t r;
      while ((r = read(fd, buf, bufsize)) > 0) bytes += r;
      if (r < 0) {
        perror("read");
        return 1;
      }
    }
    if (close(fd) < 0) {
      perror("close");
      return 1;
    }
    lat[i] = (now() - t0) * 1e6;
  }
  double total = now() - start;
  double sum = 0;
  for (int i = 0; i < n; i++) sum += lat[i];
  qsort(lat, n, sizeof(double), cmp);
  printf("%d %.6f %.2f %.2f %.2f %lld\n", n, total, lat[n / 2], lat[(int)(n * 0.99) < n ? (int)(n * 0.99) : n - 1], sum / n, bytes);
  return 0;
}
