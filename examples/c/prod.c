/*
 * prod: the producer of the DYAD tutorial's producer/consumer demo, written
 * for dyad-fs.
 *
 *   prod N DIR    writes DIR/data0.txt .. DIR/data<N-1>.txt
 *
 * File <seed> holds ten native-endian int32 values seed*10 .. seed*10+9.
 * It is a plain stdio program with no DYAD calls and no LD_PRELOAD: when DIR
 * is inside a dyad-fs mount, the daemon publishes each file as it is closed,
 * which is why fclose() is checked like any write (a failed publication is
 * reported there).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define NUM_VALS 10

static int parse_count(const char *s, long *out)
{
    char *end;
    errno = 0;
    long n = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || n < 0 || n > INT32_MAX / NUM_VALS)
        return -1;
    *out = n;
    return 0;
}

static int produce(const char *dir, long seed)
{
    char path[4096];
    int32_t vals[NUM_VALS];
    if (snprintf(path, sizeof path, "%s/data%ld.txt", dir, seed) >= (int)sizeof path) {
        fprintf(stderr, "prod: path too long for file %ld\n", seed);
        return -1;
    }
    for (int k = 0; k < NUM_VALS; k++)
        vals[k] = (int32_t)(seed * NUM_VALS + k);

    FILE *fp = fopen(path, "w");
    if (fp == NULL) {
        fprintf(stderr, "prod: cannot create %s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t written = fwrite(vals, sizeof vals[0], NUM_VALS, fp);
    int write_errno = errno;
    if (fclose(fp) != 0) {
        fprintf(stderr, "prod: closing %s failed: %s\n", path, strerror(errno));
        return -1;
    }
    if (written != NUM_VALS) {
        fprintf(stderr, "prod: short write to %s: %s\n", path, strerror(write_errno));
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    long n;
    if (argc != 3 || parse_count(argv[1], &n) != 0) {
        fprintf(stderr, "usage: %s N DIR   (write N files DIR/data<i>.txt)\n", argv[0]);
        return 2;
    }
    const char *dir = argv[2];
    /* The tutorial's job scripts create the directory first; doing it here
     * too lets the program be run by hand on a fresh node. */
    if (mkdir(dir, 0775) != 0 && errno != EEXIST) {
        fprintf(stderr, "prod: cannot create directory %s: %s\n", dir, strerror(errno));
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);

    long failed = 0;
    for (long seed = 0; seed < n; seed++) {
        if (produce(dir, seed) == 0)
            printf("File %ld: written\n", seed);
        else
            failed++;
    }
    if (failed) {
        fprintf(stderr, "prod: %ld of %ld files failed\n", failed, n);
        return 1;
    }
    return 0;
}
