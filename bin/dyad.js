#!/usr/bin/env node
import '../dist/src/cli/dyad.js';
