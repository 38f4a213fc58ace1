#!/usr/bin/env node
// The daemon's hot path is small and runs per request: let V8 optimise it
// after fewer calls. Measured on the project VM (2 vCPUs) with
// `npm run bench -- transfer` and with a fresh daemon serving a producer
// that creates 4 KiB files, 100 at a time:
//  - V8's defaults (budget 132 KB): the first thousand files ran about 1.5x
//    slower;
//  - with feedback allocated on a function's first call (not after ~1 KB
//    of its bytecode has run), and baseline (Sparkplug) code from the first
//    call instead of the interpreter until then, a fresh daemon's first 400
//    files cost less in alternating runs, the same after that;
//  - --interrupt-budget=8192, not lower: at 1024 the first small files
//    went faster still, but every code path met later was optimised after
//    a handful of calls, and those compiles (on V8's helper threads) took
//    150-250 ms of CPU from each daemon during the first large pulls: the
//    16 x 64 MiB pull ran at 1.30-1.46 GB/s (4 runs) against 1.50-1.64 at
//    8192 (3 runs), with the small-file medians within the noise of each
//    other (open-to-close 0.20-0.27 ms against 0.23-0.29).
// (--no-concurrent-recompilation has no effect when set here: V8 reads it
// when the isolate starts.)
import v8 from 'node:v8';
v8.setFlagsFromString('--interrupt-budget=8192');
v8.setFlagsFromString('--no-lazy-feedback-allocation');
v8.setFlagsFromString('--always-sparkplug');
await import('../dist/src/cli/mount.js');
