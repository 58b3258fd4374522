/**
 * The bundled extension (dist/extension.js, exactly what the .vsix ships) loaded against
 * a fake `vscode` module: activation registers the commands, the launch configuration
 * type and the panel serializer; the dashboard gets a CSP with a nonce and media-only
 * resource roots; a launch configuration starts `python -m onthefly_supervisor run`
 * in a terminal; and everything registered is disposed.
 */
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import Module, { createRequire } from 'node:module';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';

const extRoot = path.resolve(__dirname, '..', '..', '..');
const bundle = path.join(extRoot, 'dist', 'extension.js');

interface Tracked {
  dispose(): void;
  disposed: boolean;
  label: string;
}

function makeFakeVscode(workspaceDir: string) {
  const tracked: Tracked[] = [];
  const track = (label: string, extra: Record<string, unknown> = {}): Tracked & Record<string, unknown> => {
    const d = {
      label,
      disposed: false,
      dispose() {
        d.disposed = true;
      },
      ...extra,
    };
    tracked.push(d);
    return d;
  };
  const event = (label: string) => () => track(`listener:${label}`);
  const commands = new Map<string, (...args: unknown[]) => unknown>();
  const terminals: { name: string; cwd: string; shellPath: string; shellArgs: string[] }[] = [];
  const panels: Record<string, unknown>[] = [];
  let debugProvider: Record<string, (...a: unknown[]) => unknown> | undefined;
  let serializer: unknown;
  let adapterFactory: unknown;

  class Uri {
    constructor(readonly fsPath: string) {}
    get scheme() {
      return 'file';
    }
    get path() {
      return this.fsPath;
    }
    toString() {
      return `file://${this.fsPath}`;
    }
    static file(p: string) {
      return new Uri(p);
    }
    static joinPath(u: Uri, ...parts: string[]) {
      return new Uri(path.join(u.fsPath, ...parts));
    }
  }

  const vscode = {
    Uri,
    ViewColumn: { One: 1, Beside: -2 },
    StatusBarAlignment: { Left: 1, Right: 2 },
    window: {
      activeTextEditor: undefined,
      createOutputChannel: (name: string) => track(`output:${name}`, { appendLine: () => undefined, append: () => undefined, show: () => undefined }),
      createStatusBarItem: () => track('statusbar', { show: () => undefined, hide: () => undefined, text: '', tooltip: '', command: '' }),
      registerWebviewPanelSerializer: (_type: string, s: unknown) => {
        serializer = s;
        return track('serializer');
      },
      createWebviewPanel: (viewType: string, title: string, _col: unknown, options: Record<string, unknown>) => {
        const received: ((m: unknown) => void)[] = [];
        const posted: unknown[] = [];
        const disposeListeners: (() => void)[] = [];
        const panel = track(`panel:${viewType}`, {
          viewType,
          title,
          createOptions: options,
          received,
          posted,
          reveal: () => undefined,
          onDidDispose: (fn: () => void) => {
            disposeListeners.push(fn);
            return track('listener:panel.onDidDispose');
          },
          webview: {
            html: '',
            options: {},
            cspSource: 'vscode-webview://fake',
            asWebviewUri: (u: Uri) => ({ toString: () => `vscode-webview://fake${u.fsPath}` }),
            postMessage: async (m: unknown) => {
              posted.push(m);
              return true;
            },
            onDidReceiveMessage: (fn: (m: unknown) => void) => {
              received.push(fn);
              return track('listener:webview.onDidReceiveMessage');
            },
          },
        });
        const baseDispose = panel.dispose;
        panel.dispose = () => {
          if (panel.disposed) return;
          baseDispose();
          for (const fn of disposeListeners) fn();
        };
        panels.push(panel);
        return panel;
      },
      createTerminal: (opts: { name: string; cwd: string; shellPath: string; shellArgs: string[] }) => {
        terminals.push(opts);
        return track('terminal', { show: () => undefined });
      },
      showErrorMessage: async (m: string) => {
        throw new Error(`unexpected error message: ${m}`);
      },
      showWarningMessage: async () => undefined,
      showInformationMessage: async () => undefined,
      showSaveDialog: async () => undefined,
      showOpenDialog: async () => undefined,
    },
    workspace: {
      workspaceFolders: [{ uri: Uri.file(workspaceDir), name: 'ws', index: 0 }],
      textDocuments: [],
      getWorkspaceFolder: () => vscode.workspace.workspaceFolders[0],
      getConfiguration: () => ({ get: <T>(_k: string, d: T) => d }),
      createFileSystemWatcher: () =>
        track('fswatcher', { onDidCreate: event('fs.create'), onDidChange: event('fs.change'), onDidDelete: event('fs.delete') }),
      onDidChangeConfiguration: event('config'),
      onDidChangeWorkspaceFolders: event('folders'),
    },
    commands: {
      registerCommand: (id: string, fn: (...args: unknown[]) => unknown) => {
        commands.set(id, fn);
        return track(`command:${id}`);
      },
    },
    EventEmitter: class {
      private listeners: ((e: unknown) => void)[] = [];
      event = (l: (e: unknown) => void) => {
        this.listeners.push(l);
        return track('listener:emitter');
      };
      fire(e: unknown) {
        for (const l of this.listeners) l(e);
      }
      dispose() {
        this.listeners = [];
      }
    },
    DebugAdapterInlineImplementation: class {
      constructor(readonly implementation: unknown) {}
    },
    debug: {
      registerDebugAdapterDescriptorFactory: (type: string, f: unknown) => {
        assert.equal(type, 'onthefly');
        adapterFactory = f;
        return track('debugAdapterFactory');
      },
      registerDebugConfigurationProvider: (type: string, p: Record<string, (...a: unknown[]) => unknown>) => {
        assert.equal(type, 'onthefly');
        debugProvider = p;
        return track('debugProvider');
      },
    },
    extensions: { getExtension: () => undefined },
  };
  return {
    vscode,
    tracked,
    commands,
    terminals,
    panels,
    debugProvider: () => debugProvider,
    adapterFactory: () => adapterFactory as { createDebugAdapterDescriptor(): { implementation: { handleMessage(m: unknown): void; onDidSendMessage(l: (m: unknown) => void): unknown } } },
    serializer: () => serializer,
  };
}

describe('the bundled extension against a fake vscode', () => {
  let ws: string;
  let fake: ReturnType<typeof makeFakeVscode>;
  let ext: { activate(ctx: unknown): void; deactivate(): void };
  const subscriptions: { dispose(): void }[] = [];
  const M = Module as unknown as { _resolveFilename: (...a: unknown[]) => string };
  const origResolve = M._resolveFilename;

  before(() => {
    assert.ok(fs.existsSync(bundle), `${bundle} missing: run the build first`);
    ws = fs.mkdtempSync(path.join(os.tmpdir(), 'otf-ext-'));
    fake = makeFakeVscode(ws);
    const req = createRequire(bundle);
    M._resolveFilename = function (this: unknown, request: unknown, ...rest: unknown[]) {
      if (request === 'vscode') return 'vscode';
      return origResolve.call(this, request, ...rest);
    };
    (req.cache as Record<string, unknown>).vscode = { id: 'vscode', filename: 'vscode', loaded: true, exports: fake.vscode };
    ext = req(bundle);
    ext.activate({ subscriptions, extensionPath: extRoot, extensionUri: fake.vscode.Uri.file(extRoot) });
  });

  after(() => {
    M._resolveFilename = origResolve;
    fs.rmSync(ws, { recursive: true, force: true });
  });

  it('registers the commands of package.json', () => {
    const pkg = JSON.parse(fs.readFileSync(path.join(extRoot, 'package.json'), 'utf8'));
    const declared = (pkg.contributes.commands as { command: string }[]).map((c) => c.command).sort();
    assert.deepEqual([...fake.commands.keys()].sort(), declared);
    assert.ok(fake.debugProvider(), 'the onthefly launch type has a provider');
    assert.ok(fake.serializer(), 'the panel can be revived');
  });

  it('shows the dashboard with a nonce CSP and media-only resource roots, and talks to it', async () => {
    await fake.commands.get('onthefly.showDashboard')!();
    assert.equal(fake.panels.length, 1);
    const panel = fake.panels[0] as Record<string, unknown> & { webview: { html: string }; createOptions: { enableScripts: boolean; localResourceRoots: { fsPath: string }[] }; received: ((m: unknown) => void)[]; posted: { type: string }[] };
    assert.equal(panel.createOptions.enableScripts, true);
    assert.deepEqual(panel.createOptions.localResourceRoots.map((u) => u.fsPath), [path.join(extRoot, 'media')]);
    const html = panel.webview.html;
    const nonce = /script-src 'nonce-([^']+)'/.exec(html)?.[1];
    assert.ok(nonce, 'CSP has a script nonce');
    assert.match(html, new RegExp(`<script nonce="${nonce.replace(/[+/=]/g, (c) => `\\${c}`)}" src="vscode-webview://fake[^"]*media/dist/webview.js"`));
    assert.match(html, /default-src 'none'/);

    // Showing it again reveals the same panel.
    await fake.commands.get('onthefly.showDashboard')!();
    assert.equal(fake.panels.length, 1);

    // The webview says ready: the host answers with the connection state (no session here).
    panel.received[0]({ type: 'ready' });
    const t0 = Date.now();
    type Conn = { type: string; connection: { state: string; message: string } };
    const found = (): Conn | undefined => (panel.posted as Conn[]).find((m) => m.type === 'connection' && /connection\.json/.test(m.connection.message));
    while (!found() && Date.now() - t0 < 3000) await new Promise((r) => setTimeout(r, 10));
    assert.equal(found()?.connection.state, 'searching', 'no session yet: the view is told where the extension looks');
  });

  it('the bundled gRPC client loads the shipped .proto and calls a dead session finished', async () => {
    const file = path.join(ws, '.onthefly', 'sessions', 'latest', 'connection.json');
    fs.mkdirSync(path.dirname(file), { recursive: true });
    // Port 9 (discard) on loopback: nobody answers; pid 2^22+1 is above Linux's pid_max.
    fs.writeFileSync(file, JSON.stringify({ host: '127.0.0.1', port: 9, token: 't', session_id: 'old-session', pid: 4194305 }));
    await fake.commands.get('onthefly.reconnect')!();
    const panel = fake.panels[0] as { posted: { type: string; connection?: { state: string; message: string } }[] };
    const t0 = Date.now();
    const finished = () => panel.posted.find((m) => m.type === 'connection' && m.connection?.state === 'finished');
    while (!finished() && Date.now() - t0 < 5000) await new Promise((r) => setTimeout(r, 20));
    assert.match(finished()?.connection?.message ?? '(no finished state)', /session old-session finished; read-only views need a live supervisor: run `onthefly serve old-session`/);
  });

  it('a launch configuration starts `python -m onthefly_supervisor run` in a terminal', async () => {
    const script = path.join(ws, 'train.py');
    fs.writeFileSync(script, 'print(1)\n');
    const p = fake.debugProvider()!;
    const out = await p.resolveDebugConfigurationWithSubstitutedVariables(undefined, {
      type: 'onthefly',
      request: 'launch',
      name: 'x',
      program: script,
      args: ['--epochs', '2'],
      automode: true,
    });
    assert.equal(out, undefined, 'no debug session: the run lives in a terminal');
    assert.equal(fake.terminals.length, 1);
    const t = fake.terminals[0];
    assert.equal(t.shellPath, 'python3', 'no Python extension: python3');
    assert.deepEqual(t.shellArgs, ['-m', 'onthefly_supervisor', 'run', '--automode', script, '--epochs', '2']);
    assert.equal(t.cwd, ws);
    // Should a debug session start with the type anyway, its adapter ends it at once.
    const adapter = fake.adapterFactory().createDebugAdapterDescriptor().implementation;
    const sent: { type: string; event?: string; success?: boolean }[] = [];
    const sub = adapter.onDidSendMessage((m) => sent.push(m as { type: string })) as { dispose(): void };
    adapter.handleMessage({ seq: 1, type: 'request', command: 'initialize' });
    sub.dispose();
    assert.deepEqual(sent.map((m) => m.event ?? (m.success ? 'ok' : 'no')), ['ok', 'terminated']);
    const initial = p.provideDebugConfigurations() as { type: string; program: string }[];
    assert.equal(initial[0].type, 'onthefly');
    assert.equal(initial[0].program, '${file}');
  });

  it('disposes everything it registered', () => {
    for (const s of subscriptions.splice(0)) s.dispose();
    ext.deactivate();
    const leaked = fake.tracked.filter((d) => !d.disposed && !d.label.startsWith('terminal')).map((d) => d.label);
    assert.deepEqual(leaked, []);
  });
});
