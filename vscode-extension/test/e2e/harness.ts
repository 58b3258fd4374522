/**
 * The browser harness the end-to-end tests share: the real SessionWatcher + Relay (src/)
 * in node, the real webview bundle served with the extension's own HTML and CSP to
 * headless Chromium (playwright-core, Debian's /usr/bin/chromium — never a downloaded
 * browser), acquireVsCodeApi emulated: webview -> host through page.exposeFunction,
 * host -> webview through window.postMessage in the page, as VS Code delivers it.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as os from 'node:os';
import * as path from 'node:path';
import { type Browser, type Page, chromium } from 'playwright-core';
import { type HostToWebview, MessageType } from '../../shared/protocol';
import { findProto } from '../../src/client';
import { renderDashboardHtml } from '../../src/html';
import { type Dialogs, Relay } from '../../src/relay';
import { SessionWatcher } from '../../src/session';

export const extRoot = path.resolve(__dirname, '..', '..', '..');
export const repoRoot = path.resolve(extRoot, '..');
export const outDir = path.join(extRoot, 'test-output');
export const python = process.env.ONTHEFLY_PYTHON || path.join(repoRoot, '.venv', 'bin', 'python');
export const browserPath = process.env.ONTHEFLY_CHROMIUM || '/usr/bin/chromium';
export const fixtures = path.join(extRoot, 'test', 'e2e', 'fixtures');

export const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'];

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export async function waitFor<T>(what: string, fn: () => Promise<T | undefined | false | null> | T | undefined | false | null, timeoutMs = 30_000, everyMs = 100): Promise<T> {
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

export type Response = Extract<HostToWebview, { type: MessageType.Response }>;

/** A real supervisor started the way a user starts one: `onthefly run ... SCRIPT` in a fresh directory. */
export class RealSupervisor {
  readonly dir: string;
  readonly log: string;
  proc: ChildProcess;

  constructor(script: string, name: string, flags = ['--headless', '--keep-alive', '--port', '0']) {
    fs.mkdirSync(outDir, { recursive: true });
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'otf-e2e-'));
    this.log = path.join(outDir, `${name}-supervisor.log`);
    const fd = fs.openSync(this.log, 'w');
    // Its own process group, so the cleanup reaches the workers too.
    this.proc = spawn(python, ['-m', 'onthefly_supervisor', 'run', ...flags, script], {
      cwd: this.dir,
      stdio: ['ignore', fd, fd],
      detached: true,
      env: { ...process.env, PYTHONUNBUFFERED: '1' },
    });
    fs.closeSync(fd);
  }

  get connectionFile(): string {
    return path.join(this.dir, '.onthefly', 'sessions', 'latest', 'connection.json');
  }

  async ready(timeoutMs = 60_000): Promise<void> {
    await waitFor(
      'the supervisor to write connection.json',
      () => {
        if (this.proc.exitCode !== null) throw new Error(`the supervisor exited with ${this.proc.exitCode}:\n${fs.readFileSync(this.log, 'utf8').slice(-3000)}`);
        return fs.existsSync(this.connectionFile);
      },
      timeoutMs,
    );
  }

  /** `onthefly <args> --json` in the session's directory, parsed. */
  cli<T>(...args: string[]): Promise<T> {
    return new Promise((resolve, reject) => {
      execFile(python, ['-m', 'onthefly_supervisor', ...args], { cwd: this.dir, timeout: 30_000 }, (err, stdout, stderr) => {
        if (err) reject(new Error(`onthefly ${args.join(' ')} failed: ${err.message}\n${stderr}`));
        else {
          try {
            resolve(JSON.parse(stdout) as T);
          } catch (e) {
            reject(new Error(`onthefly ${args.join(' ')} printed no JSON: ${(e as Error).message}: ${stdout.slice(0, 400)}`));
          }
        }
      });
    });
  }

  get running(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }

  /** SIGTERM to the group, a bounded wait, then SIGKILL. */
  async stop(graceMs = 10_000): Promise<void> {
    const pid = this.proc.pid;
    if (pid && this.running) {
      try {
        process.kill(-pid, 'SIGTERM');
      } catch {
        /* already gone */
      }
      const t0 = Date.now();
      while (this.running && Date.now() - t0 < graceMs) await sleep(100);
    }
    if (pid) {
      try {
        process.kill(-pid, 'SIGKILL'); // workers that outlived it, or a supervisor that ignored SIGTERM
      } catch {
        /* all gone */
      }
    }
  }

  remove(): void {
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

/** The dashboard page wired to a relay that follows `connectionFile`. */
export class DashboardPage {
  watcher!: SessionWatcher;
  relay!: Relay;
  page!: Page;
  origin = '';
  readonly pageErrors: string[] = [];
  readonly cspViolations: string[] = [];
  readonly requests = new Map<number, string>();
  readonly responses = new Map<number, Response>();
  readonly savePaths: string[] = [];
  readonly openPaths: string[] = [];
  private browser!: Browser;
  private server!: http.Server;
  private pageReady = false;

  constructor(
    private readonly connectionFile: string,
    private readonly dialogDir: string,
  ) {}

  async open(): Promise<void> {
    this.watcher = new SessionWatcher({ connectionFile: this.connectionFile, protoPath: findProto(), pollMs: 200, maxBackoffMs: 1000 });
    // Host -> webview: messages posted in the same turn travel together in one
    // page.evaluate (one CDP round trip, like one IPC hop in VS Code), in order.
    let queue: HostToWebview[] = [];
    let chain: Promise<unknown> = Promise.resolve();
    const flush = (): void => {
      const batch = queue;
      queue = [];
      chain = chain.then(() =>
        this.page
          .evaluate((msgs) => {
            for (const m of msgs) window.postMessage(m, '*');
          }, batch as unknown as Record<string, unknown>[])
          .catch(() => undefined),
      );
    };
    const post = (msg: HostToWebview): void => {
      if (msg.type === MessageType.Response) this.responses.set(msg.id, msg);
      // Like VS Code: nothing reaches a webview that has not loaded yet (it asks with `ready`).
      if (!this.pageReady) return;
      queue.push(msg);
      if (queue.length === 1) setImmediate(flush);
    };
    const dialogs: Dialogs = {
      saveFile: async ({ defaultName }) => {
        const p = path.join(this.dialogDir, defaultName);
        this.savePaths.push(p);
        return p;
      },
      openFile: async () => this.openPaths.shift(),
      notify: () => undefined,
    };
    this.relay = new Relay(this.watcher, post, dialogs);
    this.watcher.start();

    this.server = http.createServer((req, res) => {
      const url = new URL(req.url ?? '/', 'http://x');
      if (url.pathname === '/favicon.ico') {
        res.writeHead(204).end();
        return;
      }
      if (url.pathname === '/') {
        res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
        res.end(renderDashboardHtml({ cspSource: this.origin, scriptUri: `${this.origin}/media/dist/webview.js`, styleUri: `${this.origin}/media/dist/webview.css` }));
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
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', () => r()));
    this.origin = `http://127.0.0.1:${(this.server.address() as { port: number }).port}`;

    this.browser = await chromium.launch({ executablePath: browserPath, headless: true, args: CHROMIUM_ARGS });
    this.page = await this.browser.newPage({ viewport: { width: 1600, height: 1100 } });
    this.page.on('pageerror', (e) => this.pageErrors.push(String(e)));
    this.page.on('console', (m) => {
      const t = m.text();
      if (/Content Security Policy|Refused to/.test(t)) this.cspViolations.push(t);
      else if (m.type() === 'error') this.pageErrors.push(`console.error: ${t}`);
    });
    await this.page.exposeFunction('__ontheflyToHost', (msg: { type?: string; id?: number; method?: string }) => {
      if (msg?.type === 'ready') this.pageReady = true;
      if (msg?.type === 'request' && typeof msg.id === 'number') this.requests.set(msg.id, String(msg.method));
      void this.relay.handle(msg);
    });
    await this.page.addInitScript(() => {
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
  }

  async goto(): Promise<void> {
    await this.page.goto(`${this.origin}/`);
  }

  async shot(name: string): Promise<void> {
    fs.mkdirSync(outDir, { recursive: true });
    await this.page.screenshot({ path: path.join(outDir, `${name}.png`), fullPage: true });
  }

  /** Clicks a button and waits until its action finished (act() marks it busy meanwhile). */
  async clickAndSettle(selector: string, timeoutMs = 40_000): Promise<void> {
    await this.page.click(selector);
    await this.page.waitForFunction((sel) => !document.querySelector(sel)?.classList.contains('busy'), selector, { timeout: timeoutMs });
  }

  /** The host's answer to the latest request of `method`. */
  lastResponse(method: string): Response | undefined {
    const ids = [...this.requests].filter(([, m]) => m === method).map(([id]) => id);
    for (const id of ids.reverse()) {
      const r = this.responses.get(id);
      if (r) return r;
    }
    return undefined;
  }

  countRequests(method: string): number {
    return [...this.requests.values()].filter((m) => m === method).length;
  }

  toasts(): Promise<string[]> {
    return this.page.$$eval('.toast-text', (els) => els.map((e) => e.textContent ?? ''));
  }

  async close(): Promise<void> {
    await this.browser?.close().catch(() => undefined);
    this.relay?.dispose();
    this.watcher?.dispose();
    await new Promise((r) => (this.server ? this.server.close(() => r(undefined)) : r(undefined)));
  }
}
