/* open + read to EOF + close of N files named DIR/f<i>, reporting the mean
 * microseconds per file. Used by bench/fuse.ts to compare mounts. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: smallread DIR N\n");
    return 2;
  }
  int n = atoi(argv[2]);
  char path[4096], buf[65536];
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (int i = 0; i < n; i++) {
    snprintf(path, sizeof path, "%s/f%d", argv[1], i);
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
      perror(path);
      return 1;
    }
    while (read(fd, buf, sizeof buf) > 0) {
    }
    close(fd);
  }
  clock_gettime(CLOCK_MONOTONIC, &b);
  double us = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 1e3;
  printf("%.2f\n", us / n);
  return 0;
}
