/*
 * train: the reading side of one epoch of data-parallel training, as a plain
 * stdio program (no DYAD code, no LD_PRELOAD).
 *
 *   train N DIR RANK WORLD EPOCH
 *
 * The dataset is N samples DIR/sample_00000.bin ... of SAMPLE_BYTES bytes;
 * byte j of sample i is (i * 31 + j * 7) & 0xff. The samples are split into
 * WORLD contiguous shards (N must be a multiple of WORLD), and in epoch E
 * rank R reads shard (R + E) % WORLD, so each epoch every rank reads samples
 * another rank read before. Every sample is checked; prints one line per
 * epoch and exits 1 if any sample is missing, short or wrong.
 */
#include <stdio.h>
#include <stdlib.h>

#define SAMPLE_BYTES 65536

int main(int argc, char **argv) {
  if (argc != 6) {
    fprintf(stderr, "usage: %s N DIR RANK WORLD EPOCH\n", argv[0]);
    return 2;
  }
  long n = atol(argv[1]), rank = atol(argv[3]), world = atol(argv[4]), epoch = atol(argv[5]);
  const char *dir = argv[2];
  if (n <= 0 || world <= 0 || rank < 0 || rank >= world || epoch < 0 || n % world != 0) {
    fprintf(stderr, "%s: need N > 0 a multiple of WORLD > 0, 0 <= RANK < WORLD, EPOCH >= 0\n", argv[0]);
    return 2;
  }
  static unsigned char buf[SAMPLE_BYTES + 1];
  long per = n / world, shard = (rank + epoch) % world, bad = 0;
  for (long i = shard * per; i < (shard + 1) * per; i++) {
    char path[4096];
    snprintf(path, sizeof path, "%s/sample_%05ld.bin", dir, i);
    FILE *f = fopen(path, "rb");
    if (!f) {
      perror(path);
      bad++;
      continue;
    }
    size_t got = fread(buf, 1, sizeof buf, f);
    fclose(f);
    int ok = got == SAMPLE_BYTES;
    for (size_t j = 0; ok && j < SAMPLE_BYTES; j++) ok = buf[j] == (unsigned char)((i * 31 + (long)j * 7) & 0xff);
    if (!ok) {
      fprintf(stderr, "%s: wrong content\n", path);
      bad++;
    }
  }
  printf("rank %ld epoch %ld: read shard %ld (%ld samples), %s\n", rank, epoch, shard, per, bad ? "BAD" : "all valid");
  return bad ? 1 : 0;
}
