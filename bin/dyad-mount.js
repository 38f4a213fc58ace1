#!/usr/bin/env node
// The daemon's hot path is small and runs per request: let V8 optimise it
// after fewer calls (measured: the first thousand small-file operations of
// a fresh daemon ran about 1.5x slower with V8's default budget).
import v8 from 'node:v8';
v8.setFlagsFromString('--interrupt-budget=4096');
await import('../dist/src/cli/mount.js');
