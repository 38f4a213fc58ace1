/*
 * cons: the consumer of the DYAD tutorial's producer/consumer demo, written
 * for dyad-fs.
 *
 *   cons N DIR    reads DIR/data0.txt .. DIR/data<N-1>.txt and checks them
 *
 * Prints "File <seed> validation: OK" or "... BAD" per file and exits 1 if
 * any file is bad or unreadable. It is a plain stdio program: on a dyad-fs
 * mount, fopen("r") of a file no node has produced yet blocks until some
 * node publishes it, and the daemon copies it into this node's storage
 * before the open returns. Nothing here knows about DYAD.
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

/* 1 if the file holds exactly the expected values, 0 if not, -1 if unreadable. */
static int consume(const char *dir, long seed)
{
    char path[4096];
    /* One spare slot: a file longer than NUM_VALS values is also wrong. */
    int32_t vals[NUM_VALS + 1];
    if (snprintf(path, sizeof path, "%s/data%ld.txt", dir, seed) >= (int)sizeof path) {
        fprintf(stderr, "cons: path too long for file %ld\n", seed);
        return -1;
    }
    FILE *fp = fopen(path, "r");
    if (fp == NULL) {
        fprintf(stderr, "cons: cannot open %s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t got = fread(vals, sizeof vals[0], NUM_VALS + 1, fp);
    int read_failed = ferror(fp);
    fclose(fp);
    if (read_failed) {
        fprintf(stderr, "cons: read error on %s\n", path);
        return -1;
    }
    if (got != NUM_VALS) {
        fprintf(stderr, "cons: %s holds %zu values, expected %d\n", path, got, NUM_VALS);
        return 0;
    }
    for (int k = 0; k < NUM_VALS; k++) {
        if (vals[k] != (int32_t)(seed * NUM_VALS + k)) {
            fprintf(stderr, "cons: %s value %d is %ld, expected %ld\n", path, k, (long)vals[k],
                    seed * NUM_VALS + k);
            return 0;
        }
    }
    return 1;
}

int main(int argc, char **argv)
{
    long n;
    if (argc != 3 || parse_count(argv[1], &n) != 0) {
        fprintf(stderr, "usage: %s N DIR   (read and check N files DIR/data<i>.txt)\n", argv[0]);
        return 2;
    }
    const char *dir = argv[2];
    /* As in the tutorial, the directory must exist on this node; only the
     * files inside it are waited for. */
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        fprintf(stderr, "cons: %s is not a directory\n", dir);
        return 1;
    }
    /* Line buffering, so whoever reads our pipe sees each file as it is checked. */
    setvbuf(stdout, NULL, _IOLBF, 0);

    long bad = 0;
    for (long seed = 0; seed < n; seed++) {
        int ok = consume(dir, seed);
        printf("File %ld validation: %s\n", seed, ok == 1 ? "OK" : "BAD");
        if (ok != 1)
            bad++;
    }
    return bad ? 1 : 0;
}
