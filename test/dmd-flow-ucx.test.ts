/**
 * The producer → consumer suite again, unchanged, with every daemon pulling
 * over UCX (DYAD_DTL_MODE=UCX), forced onto TCP on loopback as it would be
 * between hosts without RDMA.
 */
import t from 'tap';
import { ucxAvailable } from '../src/dtl/index.js';

if (!ucxAvailable()) {
  t.pass('UCX transport not built here (no libucx-dev): skipped');
} else {
  process.env.DYAD_DTL_MODE = 'UCX';
  process.env.UCX_TLS = 'tcp';
  process.env.UCX_NET_DEVICES = 'lo';
  await import('./dmd-flow.test.js');
}
