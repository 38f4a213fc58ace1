/**
 * The systemd unit template must pass `systemd-analyze verify` for a real
 * instance name (there is no systemd as PID 1 here, but verify works
 * offline), and a broken copy must fail it, so the check is real.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { repoRoot, sh, tmpdir } from './helpers/mount.js';

const haveAnalyze = fs.existsSync('/usr/bin/systemd-analyze') || fs.existsSync('/bin/systemd-analyze');

t.test('dyad-mount@.service verifies', { skip: haveAnalyze ? false : 'systemd-analyze is not installed' }, async (t) => {
  const dir = tmpdir(t);
  const unit = fs.readFileSync(path.join(repoRoot, 'systemd', 'dyad-mount@.service'), 'utf8');
  const instance = path.join(dir, 'dyad-mount@mnt-ssd-alice-dyad.service');
  fs.writeFileSync(instance, unit);
  const ok = await sh(`systemd-analyze verify ${instance}`);
  t.equal(ok.code, 0, `verify passes: ${ok.stderr}`);
  const broken = path.join(dir, 'dyad-mount@broken.service');
  fs.writeFileSync(broken, unit.replace('Type=simple', 'Type=bogus').replace('/usr/bin/env dyad-mount', 'relative/dyad-mount'));
  const bad = await sh(`systemd-analyze verify ${broken}`);
  t.not(bad.code, 0, 'a broken unit fails verify');
  const env = fs.readFileSync(path.join(repoRoot, 'systemd', 'dyad-mount.env.example'), 'utf8');
  for (const v of ['DYAD_KVS_NAMESPACE', 'DYAD_DTL_MODE', 'DYAD_RANK', 'DYAD_SECRET_FILE']) t.match(env, `${v}=`, `the example sets ${v}`);
});
