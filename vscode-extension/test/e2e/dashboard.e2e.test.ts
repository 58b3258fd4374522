/**
 * End to end, in a real browser, against a REAL supervisor:
 *
 *   onthefly run --headless --keep-alive --port 0 <script>   (cwd = a fresh temp dir)
 *        ⇅ gRPC (token)                         the real SessionWatcher + Relay (src/), in node
 *   headless Chromium (playwright-core, Debian's /usr/bin/chromium) showing the real
 *   webview bundle, served with the extension's own HTML and CSP; acquireVsCodeApi is
 *   emulated: webview -> host through page.exposeFunction, host -> webview through
 *   window.postMessage in the page, as VS Code delivers it.
 *
 * It checks that the charts fill, that Pause/Resume in the UI pause/resume the worker
 * (`onthefly status --json`), that a brushed histogram range fills the fork form and
 * Fork calls the supervisor (a new fork run when it answers ok, its error shown when
 * not), that an RPC error shows as a message, and it measures first paint, per-frame
 * and zoom round-trip times. Screenshots go to test-output/.
 *
 *   ONTHEFLY_E2E_SCRIPT   training script (default: fixtures/slow_train.py)
 *   ONTHEFLY_PYTHON       interpreter (default: <repo>/.venv/bin/python)
 *   ONTHEFLY_CHROMIUM     browser (default: /usr/bin/chromium)
 */
import assert from 'node:assert/strict';
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { chromium, type Browser, type Page } from 'playwright-core';
import { type HostToWebview, MessageType } from '../../shared/protocol';
import { findProto } from '../../src/client';
import { renderDashboardHtml } from '../../src/html';
import { type Dialogs, Relay } from '../../src/relay';
import { SessionWatcher } from '../../src/session';

const extRoot = path.resolve(__dirname, '..', '..', '..');
const repoRoot = path.resolve(extRoot, '..');
const outDir = path.join(extRoot, 'test-output');
const python = process.env.ONTHEFLY_PYTHON || path.join(repoRoot, '.venv', 'bin', 'python');
const browserPath = process.env.ONTHEFLY_CHROMIUM || '/usr/bin/chromium';
const script = path.resolve(process.env.ONTHEFLY_E2E_SCRIPT || path.join(extRoot, 'test', 'e2e', 'fixtures', 'slow_train.py'));

const TARGETS = { frameMs: 16, zoomMs: 100, firstPaintMs: 1000 };

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

async function waitFor<T>(what: string, fn: () => Promise<T | undefined | false | null> | T | undefined | false | null, timeoutMs = 30_000, everyMs = 100): Promise<T> {
  const t0 = Date.now();
  let lastErr: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (e) {
      lastErr = e;
    }
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${lastErr ? ` (last error: ${(lastErr as Error).message})` : ''}`);
    await sleep(everyMs);
  }
}

function stats(xs: number[]): { n: number; mean: number; p50: number; p95: number; max: number } {
  if (!xs.length) return { n: 0, mean: NaN, p50: NaN, p95: NaN, max: NaN };
  const s = xs.slice().sort((a, b) => a - b);
  const q = (p: number) => s[Math.min(s.length - 1, Math.floor(p * s.length))];
  return { n: s.length, mean: s.reduce((a, b) => a + b, 0) / s.length, p50: q(0.5), p95: q(0.95), max: s[s.length - 1] };
}

const f1 = (x: number) => (Number.isFinite(x) ? x.toFixed(1) : '—');

interface StatusJson {
  state: string;
  runs: { run_id: string; status: string; kind: string }[];
  workers: { run_id: string; state: string }[];
}

describe('dashboard in a browser against a real supervisor', { timeout: 180_000 }, () => {
  let tmp: string;
  let sup: ChildProcess | undefined;
  let supLog: string;
  let watcher: SessionWatcher;
  let relay: Relay;
  let server: http.Server;
  let browser: Browser;
  let page: Page;
  let origin: string;
  const pageErrors: string[] = [];
  const cspViolations: string[] = [];
  /** Requests the page sent (id -> method) and the host's answers, to see what the supervisor said. */
  const requests = new Map<number, string>();
  const responses = new Map<number, Extract<HostToWebview, { type: MessageType.Response }>>();
  const numbers: string[] = [];

  function statusJson(): Promise<StatusJson> {
    return new Promise((resolve, reject) => {
      execFile(python, ['-m', 'onthefly_supervisor', 'status', '--json'], { cwd: tmp, timeout: 30_000 }, (err, stdout, stderr) => {
        if (err) reject(new Error(`onthefly status --json failed: ${err.message}\n${stderr}`));
        else {
          try {
            resolve(JSON.parse(stdout) as StatusJson);
          } catch (e) {
            reject(new Error(`onthefly status --json printed no JSON: ${(e as Error).message}: ${stdout.slice(0, 400)}`));
          }
        }
      });
    });
  }

  async function mainState(): Promise<{ run: string; worker: string }> {
    const s = await statusJson();
    const run = s.runs.find((r) => r.run_id === 'main') ?? s.runs[0];
    const worker = s.workers.find((w) => w.run_id === 'main') ?? s.workers[0];
    return { run: run?.status ?? '', worker: worker?.state ?? '' };
  }

  async function shot(name: string): Promise<void> {
    await page.screenshot({ path: path.join(outDir, `${name}.png`), fullPage: true });
  }

  async function clickAndSettle(selector: string, timeoutMs = 40_000): Promise<void> {
    await page.click(selector);
    await page.waitForFunction((sel) => !document.querySelector(sel)?.classList.contains('busy'), selector, { timeout: timeoutMs });
  }

  function lastResponse(method: string): Extract<HostToWebview, { type: MessageType.Response }> | undefined {
    const ids = [...requests].filter(([, m]) => m === method).map(([id]) => id);
    for (const id of ids.reverse()) {
      const r = responses.get(id);
      if (r) return r;
    }
    return undefined;
  }

  async function toasts(): Promise<string[]> {
    return page.$$eval('.toast-text', (els) => els.map((e) => e.textContent ?? ''));
  }

  before(async () => {
    assert.ok(fs.existsSync(python), `no Python at ${python}: run \`make setup\` in the repository (or set ONTHEFLY_PYTHON)`);
    assert.ok(fs.existsSync(browserPath), `no browser at ${browserPath}: run \`make system-deps\` (apt-get install chromium)`);
    assert.ok(fs.existsSync(script), `no training script at ${script}`);
    fs.mkdirSync(outDir, { recursive: true });
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'otf-e2e-'));
    supLog = path.join(outDir, 'supervisor.log');
    const log = fs.openSync(supLog, 'w');
    // Its own process group, so the cleanup reaches the workers too.
    sup = spawn(python, ['-m', 'onthefly_supervisor', 'run', '--headless', '--keep-alive', '--port', '0', script], {
      cwd: tmp,
      stdio: ['ignore', log, log],
      detached: true,
      env: { ...process.env, PYTHONUNBUFFERED: '1' },
    });
    fs.closeSync(log);
    const connFile = path.join(tmp, '.onthefly', 'sessions', 'latest', 'connection.json');
    await waitFor(
      'the supervisor to write connection.json',
      () => {
        if (sup?.exitCode !== null) throw new Error(`the supervisor exited with ${sup?.exitCode}:\n${fs.readFileSync(supLog, 'utf8').slice(-3000)}`);
        return fs.existsSync(connFile);
      },
      60_000,
    );

    watcher = new SessionWatcher({ connectionFile: connFile, protoPath: findProto(), pollMs: 200 });
    let pageReady = false;
    // Host -> webview: messages posted in the same turn travel together in one
    // page.evaluate (one CDP round trip, like one IPC hop in VS Code), in order.
    let queue: HostToWebview[] = [];
    let chain: Promise<unknown> = Promise.resolve();
    const flush = (): void => {
      const batch = queue;
      queue = [];
      chain = chain.then(() =>
        page
          .evaluate((msgs) => {
            for (const m of msgs) window.postMessage(m, '*');
          }, batch as unknown as Record<string, unknown>[])
          .catch(() => undefined),
      );
    };
    const post = (msg: HostToWebview): void => {
      if (msg.type === MessageType.Response) responses.set(msg.id, msg);
      // Like VS Code: nothing reaches a webview that has not loaded yet (it asks with `ready`).
      if (!pageReady) return;
      queue.push(msg);
      if (queue.length === 1) setImmediate(flush);
    };
    const dialogs: Dialogs = {
      saveFile: async ({ defaultName }) => path.join(tmp, defaultName),
      openFile: async () => undefined,
      notify: () => undefined,
    };
    relay = new Relay(watcher, post, dialogs);
    watcher.start();
    await waitFor('the watcher to connect', () => watcher.connection.state === 'connected', 30_000);

    server = http.createServer((req, res) => {
      const url = new URL(req.url ?? '/', 'http://x');
      if (url.pathname === '/favicon.ico') {
        res.writeHead(204).end();
        return;
      }
      if (url.pathname === '/') {
        res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
        res.end(renderDashboardHtml({ cspSource: origin, scriptUri: `${origin}/media/dist/webview.js`, styleUri: `${origin}/media/dist/webview.css` }));
        return;
      }
      // Only the media folder, like localResourceRoots.
      const file = path.normalize(path.join(extRoot, decodeURIComponent(url.pathname)));
      if (!file.startsWith(path.join(extRoot, 'media') + path.sep) || !fs.existsSync(file)) {
        res.writeHead(404).end();
        return;
      }
      const type = file.endsWith('.js') ? 'text/javascript' : file.endsWith('.css') ? 'text/css' : file.endsWith('.svg') ? 'image/svg+xml' : 'application/octet-stream';
      res.writeHead(200, { 'content-type': type });
      fs.createReadStream(file).pipe(res);
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    origin = `http://127.0.0.1:${(server.address() as { port: number }).port}`;

    browser = await chromium.launch({
      executablePath: browserPath,
      headless: true,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
    });
    page = await browser.newPage({ viewport: { width: 1600, height: 1100 } });
    page.on('pageerror', (e) => pageErrors.push(String(e)));
    page.on('console', (m) => {
      const t = m.text();
      if (/Content Security Policy|Refused to/.test(t)) cspViolations.push(t);
      if (m.type() === 'error' && !/Refused to/.test(t)) pageErrors.push(`console.error: ${t}`);
    });
    await page.exposeFunction('__ontheflyToHost', (msg: { type?: string; id?: number; method?: string }) => {
      if (msg?.type === 'ready') pageReady = true;
      if (msg?.type === 'request' && typeof msg.id === 'number') requests.set(msg.id, String(msg.method));
      void relay.handle(msg);
    });
    await page.addInitScript(() => {
      let state: unknown;
      let acquired = false;
      (window as unknown as Record<string, unknown>).acquireVsCodeApi = () => {
        if (acquired) throw new Error('acquireVsCodeApi may only be called once');
        acquired = true;
        return {
          postMessage: (m: unknown) => (window as unknown as { __ontheflyToHost(m: unknown): void }).__ontheflyToHost(m),
          getState: () => state,
          setState: (s: unknown) => {
            state = s;
          },
        };
      };
    });
  });

  after(async () => {
    if (numbers.length) console.log(`\n[onthefly e2e] ${numbers.join('\n[onthefly e2e] ')}\n`);
    await browser?.close().catch(() => undefined);
    relay?.dispose();
    watcher?.dispose();
    await new Promise((r) => (server ? server.close(() => r(undefined)) : r(undefined)));
    if (sup?.pid && sup.exitCode === null) {
      const group = -sup.pid;
      try {
        process.kill(group, 'SIGTERM');
      } catch {
        /* already gone */
      }
      const t0 = Date.now();
      while (sup.exitCode === null && sup.signalCode === null && Date.now() - t0 < 10_000) await sleep(100);
      try {
        process.kill(group, 'SIGKILL'); // workers that outlived it, or a supervisor that ignored SIGTERM
      } catch {
        /* all gone */
      }
    }
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  it('loads under the CSP and fills the charts (initial GetMetrics, then live metrics events)', async () => {
    const t0 = Date.now();
    await page.goto(`${origin}/`);
    await page.waitForFunction(() => {
      const d = (window as unknown as { __ontheflyDebug?: { pointCounts(): Record<string, number> } }).__ontheflyDebug;
      return d && d.pointCounts().loss > 0;
    }, undefined, { timeout: 30_000 });
    const wallFirstPaint = Date.now() - t0;
    const firstPaint = await page.evaluate(() => (window as unknown as { __ontheflyPerf: { firstPaintMs: number } }).__ontheflyPerf.firstPaintMs);
    numbers.push(`first paint, view opened as the supervisor starts: ${f1(firstPaint)} ms after navigation start (page.goto -> loss chart drawn: ${wallFirstPaint} ms; includes waiting for the worker's first metrics)`);

    await waitFor('the connection pill to say connected', async () => (await page.textContent('#conn-state')) === 'connected');
    // Live: the loss chart keeps growing from metrics events, and val loss / accuracy / lr / grad norm / throughput fill.
    const first = await page.evaluate(() => (window as unknown as { __ontheflyDebug: { pointCounts(): Record<string, number> } }).__ontheflyDebug.pointCounts());
    const counts = await waitFor(
      'every chart to fill and the loss chart to grow live',
      async () => {
        const c = await page.evaluate(() => (window as unknown as { __ontheflyDebug: { pointCounts(): Record<string, number> } }).__ontheflyDebug.pointCounts());
        const all = ['loss', 'val_loss', 'accuracy', 'lr', 'grad_norm', 'throughput'].every((k) => c[k] > 0);
        return all && c.loss >= Math.max(30, first.loss + 10) ? c : undefined;
      },
      60_000,
      250,
    );
    numbers.push(`chart points: ${JSON.stringify(counts)}`);

    // First paint of a view opened on a session that already has data (the usual case:
    // opening the dashboard while training runs): reload and time it again.
    const reloads: number[] = [];
    for (let i = 0; i < 3; i++) {
      await page.reload();
      await page.waitForFunction(() => (window as unknown as { __ontheflyPerf?: { firstPaintMs: number | null } }).__ontheflyPerf?.firstPaintMs != null, undefined, { timeout: 30_000 });
      reloads.push(await page.evaluate(() => (window as unknown as { __ontheflyPerf: { firstPaintMs: number } }).__ontheflyPerf.firstPaintMs));
    }
    const fp = stats(reloads);
    numbers.push(`first paint, view opened on a running session: ${reloads.map(f1).join(', ')} ms after navigation start (target <= ${TARGETS.firstPaintMs} ms)`);
    assert.ok(fp.p50 <= TARGETS.firstPaintMs * 3, `first paint ${f1(fp.p50)} ms`);
    await waitFor('the connection pill to say connected again', async () => (await page.textContent('#conn-state')) === 'connected');
    assert.ok(await page.$('#runs-body tr[data-run="main"]'), 'the runs panel lists main');
    assert.ok(await page.$('#lineage-svg g[data-run="main"]'), 'the lineage graph shows main');
    await shot('01-charts');
    assert.deepEqual(cspViolations, [], 'no CSP violations');
    assert.deepEqual(pageErrors, [], 'no page errors');
  });

  it('Pause in the UI pauses the worker; Resume resumes it', async () => {
    await clickAndSettle('#btn-pause');
    const pauseReply = lastResponse('pause');
    assert.ok(pauseReply, 'the Pause button sent a pause request');
    assert.ok(pauseReply.ok, `Pause failed: ${JSON.stringify(!pauseReply.ok && pauseReply.error)}`);
    const paused = await waitFor('onthefly status to report the main run paused', async () => {
      const s = await mainState();
      return s.run === 'paused' || s.worker === 'paused' ? s : undefined;
    }, 30_000, 300);
    numbers.push(`after Pause: run ${paused.run}, worker ${paused.worker}`);
    await waitFor('the runs panel to show paused', async () => (await page.getAttribute('#runs-body tr[data-run="main"]', 'data-status')) === 'paused', 15_000);
    await shot('02-paused');

    await clickAndSettle('#btn-resume');
    const resumeReply = lastResponse('resume');
    assert.ok(resumeReply?.ok, `Resume failed: ${JSON.stringify(resumeReply && !resumeReply.ok && resumeReply.error)}`);
    const resumed = await waitFor('onthefly status to report the main run running again', async () => {
      const s = await mainState();
      return s.run === 'running' && s.worker !== 'paused' ? s : undefined;
    }, 30_000, 300);
    numbers.push(`after Resume: run ${resumed.run}, worker ${resumed.worker}`);
  });

  it('a brushed loss range fills the fork form and Fork calls the supervisor', async () => {
    await waitFor('a loss distribution', () =>
      page.evaluate(() => {
        const d = (window as unknown as { __ontheflyDebug: { distribution(): { seen: number } | null } }).__ontheflyDebug.distribution();
        return !!d && d.seen > 0;
      }),
      60_000,
      250,
    );
    const box = await page.locator('#hist-canvas').boundingBox();
    assert.ok(box);
    // Brush the upper loss tail with the mouse, right to left.
    const y = box.y + box.height / 2;
    await page.mouse.move(box.x + box.width - 10, y);
    await page.mouse.down();
    await page.mouse.move(box.x + box.width * 0.55, y, { steps: 8 });
    await page.mouse.up();
    const spec = await page.inputValue('#fork-select');
    assert.match(spec, /^quantile:(0(\.\d+)?|1\.0):(0(\.\d+)?|1\.0)$/, `the brush wrote a quantile spec, got ${spec}`);
    const [lo, hi] = spec.split(':').slice(1).map(Number);
    assert.ok(lo > 0 && lo < hi && hi <= 1, `a tail selection, got ${spec}`);
    numbers.push(`brushed selection: ${spec} (${await page.textContent('#fork-hint')})`);

    await page.fill('#fork-budget', '30');
    await page.fill('#fork-lr', '0.5');
    await page.fill('#fork-rank', '0');
    await clickAndSettle('#btn-fork', 60_000);
    const reply = lastResponse('fork');
    assert.ok(reply, 'the Fork button sent a fork request');
    await shot('03-fork');
    if (reply.ok) {
      const created = (reply.result as { runId: string }).runId;
      numbers.push(`Fork: ok, new run ${created || '(unnamed)'}`);
      const row = await waitFor('a run of kind "fork" in ListRuns and in the runs panel', async () => {
        const runs = await relay.dispatch('listRuns', {});
        return runs.some((r) => r.kind === 'fork') ? page.$('#runs-body tr[data-kind="fork"]') : undefined;
      }, 60_000, 500);
      assert.ok(row);
      await shot('04-fork-run');
    } else {
      // Not built yet (or refused): the supervisor's message must be on screen, the UI alive.
      numbers.push(`Fork: the supervisor answered ${reply.error.codeName}: ${reply.error.message}`);
      const shown = await waitFor('the fork error as a message', async () => (await toasts()).find((t) => t.includes(reply.error.codeName) && t.includes(reply.error.message.slice(0, 40))), 10_000);
      assert.match(shown, /^Fork failed: /);
      assert.equal(await page.isEnabled('#btn-fork'), true, 'the Fork button works again');
    }
  });

  it('an RPC error shows as a message, never a frozen UI', async () => {
    await clickAndSettle('#btn-health', 120_000);
    const reply = lastResponse('runHealthCheck');
    assert.ok(reply);
    if (reply.ok) {
      const rows = await page.$$('#health-result tr[data-check]');
      numbers.push(`health: ${rows.length} verdict(s)`);
      assert.ok(rows.length > 0);
    } else {
      numbers.push(`health: the supervisor answered ${reply.error.codeName}: ${reply.error.message}`);
      const text = await page.textContent('#health-result');
      assert.ok(text?.includes(reply.error.codeName), `the health panel shows the error, got ${text}`);
      assert.ok((await toasts()).some((t) => t.includes(reply.error.codeName)));
    }
    assert.equal(await page.isEnabled('#btn-health'), true);
    assert.equal(await page.isEnabled('#btn-pause'), true);
  });

  it('zoom and pan re-query GetMetrics; timings are within budget', async () => {
    // Let live updates run a while so the frame timings describe steady streaming.
    await sleep(1500);
    const before = await page.evaluate(() => (window as unknown as { __ontheflyPerf: { zooms: number[] } }).__ontheflyPerf.zooms.length);
    const getMetricsBefore = [...requests.values()].filter((m) => m === 'getMetrics').length;
    const over = await page.locator('#chart-loss .u-over').boundingBox();
    assert.ok(over);
    const y = over.y + over.height / 2;
    const zooms = 8;
    for (let i = 0; i < zooms / 2; i++) {
      // Drag-select zoom...
      await page.mouse.move(over.x + over.width * 0.2, y);
      await page.mouse.down();
      await page.mouse.move(over.x + over.width * 0.8, y, { steps: 4 });
      await page.mouse.up();
      await page.waitForFunction((n) => (window as unknown as { __ontheflyPerf: { zooms: number[] } }).__ontheflyPerf.zooms.length > n, before + 2 * i, { timeout: 10_000 });
      // ...then pan with shift+wheel.
      await page.mouse.move(over.x + over.width / 2, y);
      await page.keyboard.down('Shift');
      await page.mouse.wheel(0, 120);
      await page.keyboard.up('Shift');
      await page.waitForFunction((n) => (window as unknown as { __ontheflyPerf: { zooms: number[] } }).__ontheflyPerf.zooms.length > n, before + 2 * i + 1, { timeout: 10_000 });
      await sleep(50);
    }
    const label = await page.textContent('#zoom-label');
    assert.match(label ?? '', /^steps \d+–\d+$/);
    await shot('05-zoomed');
    const getMetricsAfter = [...requests.values()].filter((m) => m === 'getMetrics').length;
    assert.ok(getMetricsAfter - getMetricsBefore >= zooms * 6, 'every zoom/pan re-queried all six charts');
    await page.dblclick('#chart-loss .u-over');
    await waitFor('reset zoom', async () => (await page.textContent('#zoom-label')) === 'full range', 5000);

    const perf = await page.evaluate(() => (window as unknown as { __ontheflyPerf: { frames: number[]; zooms: number[]; framePoints: number[] } }).__ontheflyPerf);
    const fr = stats(perf.frames);
    const zm = stats(perf.zooms.slice(before));
    const pts = stats(perf.framePoints);
    numbers.push(`per-frame redraw: n=${fr.n} mean ${f1(fr.mean)} ms, p50 ${f1(fr.p50)}, p95 ${f1(fr.p95)}, max ${f1(fr.max)} ms (${f1(pts.p50)} points drawn per frame, p50; target <= ${TARGETS.frameMs} ms)`);
    numbers.push(`zoom/pan round-trip incl. GetMetrics: n=${zm.n} mean ${f1(zm.mean)} ms, p50 ${f1(zm.p50)}, p95 ${f1(zm.p95)}, max ${f1(zm.max)} ms (target <= ${TARGETS.zoomMs} ms)`);
    // Hard limits are looser than the targets so a loaded 2-core CI box does not flake;
    // the printed numbers are what to compare with the targets.
    assert.ok(fr.p95 <= TARGETS.frameMs * 3, `p95 frame ${f1(fr.p95)} ms`);
    assert.ok(zm.p50 <= TARGETS.zoomMs * 3, `median zoom ${f1(zm.p50)} ms`);
    assert.deepEqual(cspViolations, [], 'no CSP violations');
    assert.deepEqual(pageErrors, [], 'no page errors');
  });
});
