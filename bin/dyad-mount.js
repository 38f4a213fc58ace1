#!/usr/bin/env node
import '../dist/src/cli/mount.js';
