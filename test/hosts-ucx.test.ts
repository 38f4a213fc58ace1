/**
 * UCX between test hosts: each daemon in its own network namespace pulls
 * over UCX forced onto the host's veth (UCX_TLS=tcp, UCX_NET_DEVICES=eth0);
 * otherwise UCX sees one machine and silently uses shared memory.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { ucxAvailable } from '../src/dtl/index.js';
import { netCluster } from './helpers/netns.js';
import { sh } from './helpers/mount.js';

t.test('all-to-all over UCX between 4 hosts', { skip: ucxAvailable() ? false : 'UCX transport not built' }, async (t) => {
  process.env.UCX_TLS = 'tcp';
  process.env.UCX_NET_DEVICES = 'eth0';
  const c = await netCluster(t, 4, { args: ['--dtl', 'UCX'] });
  t.match(fs.readFileSync(c.nodes[1]!.log, 'utf8'), /ucx transfer service at ucx:\/\/10\.199\./, 'the UCX service listens on the host address');
  for (const n of c.nodes) for (const o of c.nodes) if (o !== n) fs.writeFileSync(path.join(n.mnt, `${n.rank}-${o.rank}`), Buffer.alloc(3 << 20, n.rank * 16 + o.rank));
  let ok = 0;
  for (const n of c.nodes) {
    for (const o of c.nodes) {
      if (o === n) continue;
      const r = await sh(`md5sum < ${path.join(n.mnt, `${o.rank}-${n.rank}`)}`, { timeoutMs: 60_000 });
      const want = await sh(`md5sum < ${path.join(o.storage, `${o.rank}-${n.rank}`)}`);
      if (r.code === 0 && r.stdout === want.stdout) ok++;
    }
  }
  t.equal(ok, 12, 'all 12 files arrived intact over UCX');
});
