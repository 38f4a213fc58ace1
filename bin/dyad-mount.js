#!/usr/bin/env node
// The daemon's hot path is small and runs per request: let V8 optimise it
// after fewer calls. Measured on the project VM, a fresh daemon serving a
// producer that creates 4 KiB files, 100 at a time:
//  - V8's defaults: the first thousand files ran about 1.5x slower;
//  - --interrupt-budget=4096: the first 400 files took 480-550 us each;
//  - --interrupt-budget=1024 with feedback allocated on a function's first
//    call (not after ~1 KB of its bytecode has run): 376-470 us, the same
//    after that. Going further (512) cost more in recompiles than it gained;
//  - and baseline (Sparkplug) code from a function's first call instead of
//    the interpreter until then: over the first 400 files, 4-90 us less per
//    file in 5 of 6 alternating runs (mean 35 us), the same after that;
//  - and optimised code compiled on the main thread, where it is used at
//    once, instead of on a helper thread that the daemon, the application
//    and the kernel leave little CPU to on a small node: over the first 400
//    files, 18-79 us less per file in 6 of 6 alternating runs (mean 55 us),
//    with the same p99 per 100 files. A compile then holds up the requests
//    behind it for a few ms, which happens while the daemon warms up and
//    seldom after.
import v8 from 'node:v8';
v8.setFlagsFromString('--interrupt-budget=1024');
v8.setFlagsFromString('--no-lazy-feedback-allocation');
v8.setFlagsFromString('--always-sparkplug');
v8.setFlagsFromString('--no-concurrent-recompilation');
await import('../dist/src/cli/mount.js');
