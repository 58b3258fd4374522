// Runs every extension test: the unit tests (shared logic, conversion, relay against a
// fake gRPC server, the bundled extension against a fake `vscode`), then the browser
// end-to-end test against a real supervisor. Exits non-zero when any of them fails.
//   ONTHEFLY_SKIP_E2E=1   skip the browser test (says so loudly; CI must not set it)
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const outDir = path.join(root, 'out', 'test');

function files(dir) {
  const d = path.join(outDir, dir);
  return fs.existsSync(d) ? fs.readdirSync(d).filter((f) => f.endsWith('.test.cjs')).map((f) => path.join(d, f)).sort() : [];
}

function run(label, testFiles, extra = []) {
  if (!testFiles.length) {
    console.error(`${label}: no tests found in ${outDir}; did the build run?`);
    return false;
  }
  console.log(`\n=== ${label} (${testFiles.length} file${testFiles.length === 1 ? '' : 's'}) ===`);
  const t0 = Date.now();
  const r = spawnSync(process.execPath, ['--enable-source-maps', '--test', '--test-reporter=spec', ...extra, ...testFiles], { stdio: 'inherit', cwd: root });
  console.log(`=== ${label}: ${r.status === 0 ? 'passed' : 'FAILED'} in ${((Date.now() - t0) / 1000).toFixed(1)} s ===`);
  return r.status === 0;
}

const unitOk = run('unit tests', files('unit'));
let e2eOk = true;
if (process.env.ONTHEFLY_SKIP_E2E === '1') {
  console.log('\n!!! ONTHEFLY_SKIP_E2E=1: the browser end-to-end test was NOT run !!!');
} else {
  e2eOk = run('browser end-to-end test', files('e2e'), ['--test-concurrency=1']);
}
process.exit(unitOk && e2eOk ? 0 : 1);
