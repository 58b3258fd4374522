/**
 * The relay and the session watcher against a fake ControlService (@grpc/grpc-js Server
 * on 127.0.0.1:0): token metadata, request -> RPC mapping, errors as data, event replay
 * from the last sequence number after a reconnect, session changes, finished sessions.
 * (The browser end-to-end test runs the same code against the real supervisor.)
 */
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { type HostToWebview, MessageType } from '../../shared/protocol';
import { TOKEN_METADATA_KEY, controlServiceDefinition, findProto } from '../../src/client';
import type { PEvent } from '../../src/protoTypes';
import { type Dialogs, Relay } from '../../src/relay';
import { SessionWatcher } from '../../src/session';

const protoPath = findProto();
const TOKEN = 'secret-token';

interface FakeState {
  events: PEvent[];
  watchFromSeqs: number[];
  calls: { method: string; request: Record<string, unknown> }[];
  tokensSeen: string[];
  streams: Set<grpc.ServerWritableStream<unknown, unknown>>;
  sessionId: string;
}

function ev(seq: number, kind = 'log', payload: Record<string, unknown> = { level: 'info', text: `event ${seq}` }): PEvent {
  return { seq, time: 1000 + seq, kind, run_id: 'main', payload_json: JSON.stringify(payload) };
}

const STATUS = (sessionId: string) => ({
  session_id: sessionId,
  session_dir: '/tmp/x',
  script: 'train.py',
  argv: [],
  started: 1,
  automode: false,
  workers: [],
  runs: [],
  gpus: [],
  last_event_seq: 0,
  state: 'running',
  port: 1,
});

async function startFake(state: FakeState): Promise<{ server: grpc.Server; port: number }> {
  const server = new grpc.Server();
  const authed = (call: { metadata: grpc.Metadata }): boolean => {
    const t = String(call.metadata.get(TOKEN_METADATA_KEY)[0] ?? '');
    state.tokensSeen.push(t);
    return t === TOKEN;
  };
  const unary =
    (method: string, reply: (req: Record<string, unknown>) => unknown) =>
    (call: grpc.ServerUnaryCall<Record<string, unknown>, unknown>, cb: grpc.sendUnaryData<unknown>) => {
      if (!authed(call)) return cb({ code: grpc.status.UNAUTHENTICATED, details: 'missing or wrong session token' });
      state.calls.push({ method, request: call.request });
      try {
        cb(null, reply(call.request));
      } catch (e) {
        cb(e as grpc.ServiceError);
      }
    };
  const unimplemented = (what: string) => () => {
    throw Object.assign(new Error(what), { code: grpc.status.UNIMPLEMENTED, details: `${what} is not built yet in this version of OnTheFly` });
  };
  server.addService(controlServiceDefinition(protoPath), {
    GetStatus: unary('GetStatus', () => STATUS(state.sessionId)),
    ListRuns: unary('ListRuns', () => ({
      runs: [
        { run_id: 'main', name: 'baseline', kind: 'main', status: 'RUN_STATUS_RUNNING', parents: [], step: 10, epoch: 0, last_loss: 0.5, val_loss: NaN },
        { run_id: 'fork-1', name: 'fork-1', kind: 'fork', status: 'RUN_STATUS_PENDING', parents: ['main'] },
      ],
    })),
    GetMetrics: unary('GetMetrics', (r) => ({ run_id: 'main', key: r.key, steps: [1, 2, 3], values: [0.9, NaN, 0.7], total_points: 3 })),
    Pause: unary('Pause', (r) => ({ ok: true, message: 'paused at step 10', run_id: r.run || 'main' })),
    Fork: unary('Fork', unimplemented('fork')),
    Stop: unary('Stop', () => {
      throw Object.assign(new Error('x'), { code: grpc.status.FAILED_PRECONDITION, details: 'run main already finished' });
    }),
    ExportSlice: unary('ExportSlice', (r) => ({ ok: true, path: r.path, rows: 42, message: '', sha256: 'ab' })),
    WatchEvents: (call: grpc.ServerWritableStream<{ from_seq: number; client: string }, unknown>) => {
      if (!authed(call)) {
        call.destroy(Object.assign(new Error('denied'), { code: grpc.status.UNAUTHENTICATED }));
        return;
      }
      state.watchFromSeqs.push(Number(call.request.from_seq));
      for (const e of state.events) if (e.seq > Number(call.request.from_seq)) call.write(e);
      state.streams.add(call as grpc.ServerWritableStream<unknown, unknown>);
      call.on('cancelled', () => state.streams.delete(call as grpc.ServerWritableStream<unknown, unknown>));
    },
  });
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
  );
  return { server, port };
}

async function waitFor<T>(what: string, fn: () => T | undefined | false, timeoutMs = 5000): Promise<T> {
  const t0 = Date.now();
  for (;;) {
    const v = fn();
    if (v) return v;
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

function writeConnection(file: string, port: number, sessionId: string, pid = process.pid, token = TOKEN): void {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const tmp = `${file}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify({ host: '127.0.0.1', port, token, session_id: sessionId, pid }));
  fs.renameSync(tmp, file);
}

class Harness {
  posted: HostToWebview[] = [];
  dialogPaths: (string | undefined)[] = [];
  notified: string[] = [];
  watcher: SessionWatcher;
  relay: Relay;
  private nextId = 1;

  constructor(file: string, extra: Partial<ConstructorParameters<typeof SessionWatcher>[0]> = {}) {
    this.watcher = new SessionWatcher({ connectionFile: file, protoPath, pollMs: 50, minBackoffMs: 30, maxBackoffMs: 200, probeTimeoutMs: 1000, eventBatchMs: 5, ...extra });
    const dialogs: Dialogs = {
      saveFile: async () => this.dialogPaths.shift(),
      openFile: async () => this.dialogPaths.shift(),
      notify: (_l, t) => this.notified.push(t),
    };
    this.relay = new Relay(this.watcher, (m) => this.posted.push(JSON.parse(JSON.stringify(m)) as HostToWebview), dialogs);
    this.watcher.start();
  }

  async request(method: string, params: Record<string, unknown> = {}): Promise<Extract<HostToWebview, { type: MessageType.Response }>> {
    const id = this.nextId++;
    await this.relay.handle({ type: 'request', id, method, params });
    return waitFor(`response ${id}`, () => this.posted.find((m) => m.type === MessageType.Response && m.id === id) as Extract<HostToWebview, { type: MessageType.Response }> | undefined);
  }

  eventSeqs(): number[] {
    return this.posted.flatMap((m) => (m.type === MessageType.Events && !m.replay ? m.events.map((e) => e.seq) : []));
  }

  dispose(): void {
    this.relay.dispose();
    this.watcher.dispose();
  }
}

describe('relay + session watcher against a fake supervisor', () => {
  let dir: string;
  let file: string;
  const servers: grpc.Server[] = [];

  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'otf-relay-'));
    file = path.join(dir, '.onthefly', 'sessions', 'latest', 'connection.json');
  });

  after(() => {
    for (const s of servers) s.forceShutdown();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('searches until connection.json appears, then connects with the token and follows events', async () => {
    const state: FakeState = { events: [ev(1), ev(2)], watchFromSeqs: [], calls: [], tokensSeen: [], streams: new Set(), sessionId: 's1' };
    const { server, port } = await startFake(state);
    servers.push(server);
    const h = new Harness(file);
    try {
      await waitFor('searching', () => h.watcher.connection.state === 'searching');
      writeConnection(file, port, 's1');
      await waitFor('connected', () => h.watcher.connection.state === 'connected');
      await waitFor('events 1,2', () => h.eventSeqs().length === 2);
      assert.deepEqual(h.eventSeqs(), [1, 2]);
      assert.deepEqual(state.watchFromSeqs, [0]);
      assert.ok(state.tokensSeen.length > 0 && state.tokensSeen.every((t) => t === TOKEN), 'every call carries x-onthefly-token');

      // A (re)loaded view gets the connection and the recent log events.
      await h.relay.handle({ type: 'ready' });
      const conn = h.posted.filter((m) => m.type === MessageType.Connection).pop();
      assert.equal(conn?.type === MessageType.Connection && conn.connection.state, 'connected');
      const replay = h.posted.find((m) => m.type === MessageType.Events && m.replay);
      assert.deepEqual(replay?.type === MessageType.Events && replay.events.map((e) => e.seq), [1, 2]);

      // Live events keep flowing.
      const live = ev(3, 'metrics', { step: [1], loss: [0.5] });
      state.events.push(live);
      for (const s of state.streams) s.write(live);
      await waitFor('event 3', () => h.eventSeqs().includes(3));
    } finally {
      h.dispose();
    }
  });

  it('maps requests to RPCs; errors come back as data', async () => {
    const state: FakeState = { events: [], watchFromSeqs: [], calls: [], tokensSeen: [], streams: new Set(), sessionId: 's2' };
    const { server, port } = await startFake(state);
    servers.push(server);
    writeConnection(file, port, 's2');
    const h = new Harness(file);
    try {
      await waitFor('connected', () => h.watcher.connection.state === 'connected');

      const runs = await h.request('listRuns');
      assert.ok(runs.ok);
      const list = runs.ok ? (runs.result as { runId: string; status: string; valLoss: number | null; parents: string[] }[]) : [];
      assert.deepEqual(list.map((r) => [r.runId, r.status, r.parents]), [['main', 'running', []], ['fork-1', 'pending', ['main']]]);
      assert.equal(list[0].valLoss, null, 'NaN arrives as null');

      const metrics = await h.request('getMetrics', { run: 'main', key: 'loss', fromStep: 10.4, toStep: 20.2, maxPoints: 300 });
      assert.ok(metrics.ok && JSON.stringify((metrics.result as { values: unknown }).values) === '[0.9,null,0.7]');
      assert.deepEqual(state.calls.find((c) => c.method === 'GetMetrics')?.request, { run: 'main', key: 'loss', from_step: 10, to_step: 21, max_points: 300 });

      const pause = await h.request('pause', { run: 'main' });
      assert.ok(pause.ok && (pause.result as { message: string }).message === 'paused at step 10');
      assert.equal(state.calls.find((c) => c.method === 'Pause')?.request.wait, true, 'pause waits for the worker');

      const fork = await h.request('fork', { run: 'main', select: 'quantile:0.85:1.0', budgetSteps: 100, lrMul: 0.5, adaptersRank: 4 });
      assert.equal(fork.ok, false);
      assert.equal(!fork.ok && fork.error.codeName, 'UNIMPLEMENTED');
      assert.match(!fork.ok ? fork.error.message : '', /not built yet/);

      const stop = await h.request('stop', { run: 'main' });
      assert.equal(!stop.ok && stop.error.codeName, 'FAILED_PRECONDITION');

      const merge = await h.request('merge', { method: 'swa', runs: ['main'] });
      assert.equal(!merge.ok && merge.error.codeName, 'UNIMPLEMENTED', 'a handler the fake lacks is UNIMPLEMENTED');

      const badId = 9999;
      await h.relay.handle({ type: 'request', id: badId, method: 'pause', params: { run: 7 } });
      const bad = h.posted.find((m) => m.type === MessageType.Response && m.id === badId);
      assert.equal(bad?.type === MessageType.Response && !bad.ok && bad.error.codeName, 'INVALID_ARGUMENT');

      h.dialogPaths.push(path.join(dir, 'slice.csv'));
      const exp = await h.request('exportSlice', { run: 'main', select: 'quantile:0.9:1.0', format: 'csv' });
      assert.ok(exp.ok);
      assert.deepEqual(state.calls.find((c) => c.method === 'ExportSlice')?.request, { run: 'main', select: 'quantile:0.9:1.0', format: 'csv', path: path.join(dir, 'slice.csv'), force: true });

      const before = state.calls.length;
      h.dialogPaths.push(undefined);
      const cancelled = await h.request('exportSlice', { run: 'main', select: 'all', format: 'json' });
      assert.ok(cancelled.ok && cancelled.result === null, 'a cancelled dialog is a null result');
      assert.equal(state.calls.length, before, 'and no RPC');

      await h.relay.handle({ type: 'notify', level: 'warning', text: 'hello' });
      assert.deepEqual(h.notified, ['hello']);
    } finally {
      h.dispose();
    }
  });

  it('reconnects after the supervisor goes away and replays from the last sequence number', async () => {
    const state: FakeState = { events: [ev(1), ev(2), ev(3)], watchFromSeqs: [], calls: [], tokensSeen: [], streams: new Set(), sessionId: 's3' };
    const first = await startFake(state);
    writeConnection(file, first.port, 's3');
    const h = new Harness(file);
    try {
      await waitFor('events 1-3', () => h.eventSeqs().length === 3);
      first.server.forceShutdown();
      await waitFor('reconnecting', () => h.watcher.connection.state === 'reconnecting');

      // The supervisor comes back on another port (e.g. `onthefly serve`), with more events.
      state.events.push(ev(4), ev(5));
      const second = await startFake(state);
      servers.push(second.server);
      writeConnection(file, second.port, 's3');
      await waitFor('connected again', () => h.watcher.connection.state === 'connected', 8000);
      await waitFor('events 4,5', () => h.eventSeqs().length === 5);
      assert.deepEqual(h.eventSeqs(), [1, 2, 3, 4, 5], 'nothing lost, nothing twice');
      assert.deepEqual(state.watchFromSeqs.slice(-1), [3], 'resumed from the last seen seq');
    } finally {
      h.dispose();
    }
  });

  it('a new session id resets the sequence and tells the view', async () => {
    const state: FakeState = { events: [ev(1), ev(2)], watchFromSeqs: [], calls: [], tokensSeen: [], streams: new Set(), sessionId: 'old' };
    const srv = await startFake(state);
    servers.push(srv.server);
    writeConnection(file, srv.port, 'old');
    const h = new Harness(file);
    try {
      await waitFor('events', () => h.eventSeqs().length === 2);
      const state2: FakeState = { events: [ev(1, 'log', { text: 'new session' })], watchFromSeqs: [], calls: [], tokensSeen: [], streams: new Set(), sessionId: 'new' };
      const srv2 = await startFake(state2);
      servers.push(srv2.server);
      writeConnection(file, srv2.port, 'new');
      await waitFor('session changed', () => h.posted.find((m) => m.type === MessageType.SessionChanged));
      await waitFor('new session events', () => state2.watchFromSeqs.length > 0);
      assert.deepEqual(state2.watchFromSeqs, [0]);
      assert.equal(h.watcher.connection.sessionId, 'new');
    } finally {
      h.dispose();
    }
  });

  it('a wrong token is reported, not retried silently', async () => {
    const state: FakeState = { events: [], watchFromSeqs: [], calls: [], tokensSeen: [], streams: new Set(), sessionId: 's4' };
    const srv = await startFake(state);
    servers.push(srv.server);
    writeConnection(file, srv.port, 's4', process.pid, 'stale');
    const h = new Harness(file);
    try {
      await waitFor('token message', () => h.watcher.connection.state === 'reconnecting' && /token/.test(h.watcher.connection.message));
      const r = await h.request('listRuns');
      assert.equal(!r.ok && r.error.codeName, 'UNAVAILABLE', 'requests fail fast while disconnected');
    } finally {
      h.dispose();
    }
  });

  it('a session folder whose supervisor removed connection.json on exit is a finished session', async () => {
    const root = path.join(dir, 'finished-ws', '.onthefly', 'sessions');
    const sdir = path.join(root, '20260101-000000-abcd');
    fs.mkdirSync(sdir, { recursive: true });
    fs.writeFileSync(path.join(sdir, 'session.db'), '');
    fs.symlinkSync('20260101-000000-abcd', path.join(root, 'latest'));
    const h = new Harness(path.join(root, 'latest', 'connection.json'));
    try {
      await waitFor('finished', () => h.watcher.connection.state === 'finished');
      assert.equal(h.watcher.connection.sessionId, '20260101-000000-abcd');
      assert.match(h.watcher.connection.message, /run `onthefly serve 20260101-000000-abcd`/);
    } finally {
      h.dispose();
    }
  });

  it('a connection file whose supervisor process is gone is a finished session', async () => {
    // A port nobody listens on, and a pid that is not alive.
    const probe = await startFake({ events: [], watchFromSeqs: [], calls: [], tokensSeen: [], streams: new Set(), sessionId: 'x' });
    probe.server.forceShutdown();
    writeConnection(file, probe.port, 'done-session', 999_999);
    const h = new Harness(file, { isPidAlive: () => false });
    try {
      await waitFor('finished', () => h.watcher.connection.state === 'finished');
      assert.match(h.watcher.connection.message, /session done-session finished; read-only views need a live supervisor: run `onthefly serve done-session`/);
    } finally {
      h.dispose();
    }
  });
});
