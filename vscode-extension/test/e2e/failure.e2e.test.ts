/**
 * A worker that fails, against a REAL supervisor: the dashboard shows the root cause that
 * crossed the process boundary (message, file:line, traceback) and the failed run; when
 * the supervisor then exits, the view says the session is finished and how to get its
 * read-only views back (`onthefly serve SESSION`), and the controls stop taking clicks.
 */
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { DashboardPage, RealSupervisor, browserPath, fixtures, python, waitFor } from './harness';

describe('a failed worker in the browser', { timeout: 120_000 }, () => {
  let sup: RealSupervisor;
  let d: DashboardPage;

  before(async () => {
    assert.ok(fs.existsSync(python), `no Python at ${python}: run \`make setup\``);
    assert.ok(fs.existsSync(browserPath), `no browser at ${browserPath}: run \`make system-deps\``);
    sup = new RealSupervisor(path.join(fixtures, 'crash_train.py'), 'failure');
    await sup.ready();
    d = new DashboardPage(sup.connectionFile, sup.dir);
    await d.open();
  });

  after(async () => {
    await d?.close();
    await sup?.stop();
    sup?.remove();
  });

  it('shows the root cause: message, file:line and traceback', async () => {
    await d.goto();
    const box = await waitFor('the root cause box', () => d.page.$('#errors .error-box.root-cause'), 60_000, 200);
    const message = await box.$eval('.error-message', (e) => e.textContent);
    assert.equal(message, 'ValueError: synthetic failure in the loss at call 5');
    const loc = await box.$eval('.error-loc', (e) => e.textContent);
    assert.match(loc ?? '', /crash_train\.py:16$/);
    const tb = await box.$eval('pre', (e) => e.textContent);
    assert.match(tb ?? '', /raise ValueError\("synthetic failure in the loss at call 5"\)/);
    await waitFor('the failed main run', async () => (await d.page.getAttribute('#runs-body tr[data-run="main"]', 'data-status')) === 'failed', 20_000);
    const title = await d.page.getAttribute('#runs-body tr[data-run="main"]', 'title');
    assert.match(title ?? '', /synthetic failure/, 'the run row carries RunInfo.error');
    await d.shot('10-root-cause');
    assert.deepEqual(d.pageErrors, []);
    assert.deepEqual(d.cspViolations, []);
  });

  it('says the session finished once the supervisor is gone', async () => {
    const sessionId = d.watcher.connection.sessionId;
    assert.ok(sessionId);
    await sup.stop();
    await waitFor('the finished state', async () => (await d.page.textContent('#conn-state')) === 'finished', 20_000, 200);
    const banner = await d.page.textContent('#banner');
    assert.equal(banner, `session ${sessionId} finished; read-only views need a live supervisor: run \`onthefly serve ${sessionId}\``);
    assert.equal(await d.page.isDisabled('#btn-pause'), true, 'no controls without a supervisor');
    // What the view showed stays visible.
    assert.ok(await d.page.$('#errors .error-box.root-cause'));
    await d.shot('11-finished');
  });
});
