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
import { RpcError, findProto } from '../../src/client';
import type { PEvent } from '../../src/protoTypes';
import { FAKE_TOKEN, FakeSupervisor, fakeEvent, grpcError } from '../fakeSupervisor';
import { type Dialogs, Relay } from '../../src/relay';
import { SessionWatcher } from '../../src/session';

const protoPath = findProto();
const TOKEN = FAKE_TOKEN;
const ev = (seq: number, kind?: string, payload?: Record<string, unknown>) => fakeEvent(seq, kind, payload);

/** The answers of the relay test's supervisor: some RPCs built, some refusing, the rest UNIMPLEMENTED. */
function handlers(): Record<string, (req: Record<string, unknown>) => unknown> {
  return {
    ListRuns: () => ({
      runs: [
        { run_id: 'main', name: 'baseline', kind: 'main', status: 'RUN_STATUS_RUNNING', parents: [], step: 10, epoch: 0, last_loss: 0.5, val_loss: NaN },
        { run_id: 'fork-1', name: 'fork-1', kind: 'fork', status: 'RUN_STATUS_PENDING', parents: ['main'] },
      ],
    }),
    GetMetrics: (r) => ({ run_id: 'main', key: r.key, steps: [1, 2, 3], values: [0.9, NaN, 0.7], total_points: 3 }),
    Pause: (r) => ({ ok: true, message: 'paused at step 10', run_id: r.run || 'main' }),
    Fork: () => {
      throw grpcError(grpc.status.UNIMPLEMENTED, 'fork is not built yet in this version of OnTheFly');
    },
    Stop: () => {
      throw grpcError(grpc.status.FAILED_PRECONDITION, 'run main already finished');
    },
    ExportSlice: (r) => ({ ok: true, path: r.path, rows: 42, message: '', sha256: 'ab' }),
  };
}

async function fake(sessionId: string, events: PEvent[] = []): Promise<FakeSupervisor> {
  return new FakeSupervisor({ sessionId, events, handlers: handlers() }).start();
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
  const fakes: FakeSupervisor[] = [];
  const track = (f: FakeSupervisor): FakeSupervisor => {
    fakes.push(f);
    return f;
  };

  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'otf-relay-'));
    file = path.join(dir, '.onthefly', 'sessions', 'latest', 'connection.json');
  });

  after(() => {
    for (const f of fakes) f.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('searches until connection.json appears, then connects with the token and follows events', async () => {
    const sup = track(await fake('s1', [ev(1), ev(2)]));
    const h = new Harness(file);
    try {
      await waitFor('searching', () => h.watcher.connection.state === 'searching');
      sup.writeConnection(file);
      await waitFor('connected', () => h.watcher.connection.state === 'connected');
      await waitFor('events 1,2', () => h.eventSeqs().length === 2);
      assert.deepEqual(h.eventSeqs(), [1, 2]);
      assert.deepEqual(sup.watchFromSeqs, [0]);
      assert.ok(sup.tokensSeen.length > 0 && sup.tokensSeen.every((t) => t === TOKEN), 'every call carries x-onthefly-token');

      // A (re)loaded view gets the connection and the recent log events.
      await h.relay.handle({ type: 'ready' });
      const conn = h.posted.filter((m) => m.type === MessageType.Connection).pop();
      assert.equal(conn?.type === MessageType.Connection && conn.connection.state, 'connected');
      const replay = h.posted.find((m) => m.type === MessageType.Events && m.replay);
      assert.deepEqual(replay?.type === MessageType.Events && replay.events.map((e) => e.seq), [1, 2]);

      // Live events keep flowing.
      sup.publish('metrics', { step: [1], loss: [0.5] });
      await waitFor('event 3', () => h.eventSeqs().includes(3));
    } finally {
      h.dispose();
    }
  });

  it('maps requests to RPCs; errors come back as data', async () => {
    const sup = track(await fake('s2'));
    sup.writeConnection(file);
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
      assert.deepEqual(sup.lastCall('GetMetrics'), { run: 'main', key: 'loss', from_step: 10, to_step: 21, max_points: 300 });

      const pause = await h.request('pause', { run: 'main' });
      assert.ok(pause.ok && (pause.result as { message: string }).message === 'paused at step 10');
      assert.equal(sup.lastCall('Pause')?.wait, true, 'pause waits for the worker');

      const fork = await h.request('fork', { run: 'main', select: 'quantile:0.85:1.0', budgetSteps: 100, lrMul: 0.5, adaptersRank: 4 });
      assert.equal(fork.ok, false);
      assert.equal(!fork.ok && fork.error.codeName, 'UNIMPLEMENTED');
      assert.match(!fork.ok ? fork.error.message : '', /not built yet/);
      // wd_mul is `optional`: the relay leaves it unset unless the view gives one (unset = the
      // supervisor's 1.0; 0 = no weight decay). Decoded, an unset optional has no `_wd_mul`
      // case (and, with a proto where it is not optional yet, reads as the default 0).
      const forkCall = (): Record<string, unknown> => {
        const { wd_mul: wd, _wd_mul: wdSet, ...rest } = { ...sup.lastCall('Fork') } as Record<string, unknown>;
        return { ...rest, wd_mul: wdSet === 'wd_mul' ? wd : 'unset' };
      };
      assert.deepEqual(
        forkCall(),
        {
          run: 'main', select: 'quantile:0.85:1.0', budget_steps: 100, lr_mul: 0.5, wd_mul: 'unset', adapters_rank: 4, variants: 0, name: '', checkpoint: '',
          variant_lr_muls: [], race_eta: 0, race_metric: '', race_mode: '',
          early_stop_patience: 0, early_stop_metric: '', early_stop_min_delta: 0, early_stop_every: 0,
        },
      );

      // A race of variants spread around lr_mul, with every race option.
      await h.request('fork', { run: 'main', select: 'all', budgetSteps: 240, lrMul: 0.5, adaptersRank: 0, variants: 4, raceEta: 3, raceMetric: 'val', raceMode: 'sync', name: 'r' });
      assert.deepEqual(
        forkCall(),
        {
          run: 'main', select: 'all', budget_steps: 240, lr_mul: 0.5, wd_mul: 'unset', adapters_rank: 0, variants: 4, name: 'r', checkpoint: '',
          variant_lr_muls: [], race_eta: 3, race_metric: 'val', race_mode: 'sync',
          early_stop_patience: 0, early_stop_metric: '', early_stop_min_delta: 0, early_stop_every: 0,
        },
      );
      // A weight-decay multiplier the view gives goes as given, 0 included.
      for (const wdMul of [0.5, 0]) {
        await h.request('fork', { run: 'main', select: 'all', budgetSteps: 200, lrMul: 1, adaptersRank: 0, wdMul });
        assert.equal((sup.lastCall('Fork') as Record<string, unknown>).wd_mul, wdMul);
      }
      // Early stopping rides along to the supervisor as given.
      await h.request('fork', { run: 'main', select: 'all', budgetSteps: 200, lrMul: 1, adaptersRank: 0, earlyStopPatience: 3, earlyStopMetric: 'val', earlyStopMinDelta: 0.001, earlyStopEvery: 20 });
      const early = sup.lastCall('Fork') as Record<string, unknown>;
      assert.deepEqual(
        [early.early_stop_patience, early.early_stop_metric, early.early_stop_min_delta, early.early_stop_every],
        [3, 'val', 0.001, 20],
      );
      // Explicit lr multipliers: their count is the variants; unset options stay at the supervisor's defaults.
      await h.request('fork', { run: 'main', select: 'all', budgetSteps: 240, lrMul: 1, adaptersRank: 0, variantLrMuls: [0.25, 1, 4] });
      const explicit = sup.lastCall('Fork') as Record<string, unknown>;
      assert.deepEqual(
        [explicit.variants, explicit.variant_lr_muls, explicit.race_eta, explicit.race_metric, explicit.race_mode],
        [3, [0.25, 1, 4], 0, '', ''],
      );

      // Bad race options never reach the supervisor: INVALID_ARGUMENT with the reason.
      const forks = sup.calls.filter((c) => c.method === 'Fork').length;
      for (const [params, re] of [
        [{ variants: 1, raceEta: 3 }, /race options need 2 or more variants/],
        [{ variants: 4, raceEta: 9 }, /race eta must be an integer in 2\.\.8/],
        [{ variants: 4, raceMetric: 'train' }, /compare on must be one of slice, val/],
        [{ variants: 4, raceMode: 'fast' }, /race mode must be one of asha, sync/],
        [{ variantLrMuls: [0.5, -1] }, /positive/],
        [{ variants: 20 }, /1\.\.16/],
        // Early stopping the supervisor would refuse is refused here with its rule.
        [{ earlyStopPatience: -1 }, /early-stop patience -1: must be an integer in 0\.\.1000000/],
        [{ earlyStopMetric: 'val' }, /early-stop metric\/min delta\/every need a patience N \(N >= 1\)/],
        [{ earlyStopPatience: 2, earlyStopMetric: 'train' }, /early-stop metric "train": one of slice, val/],
        [{ earlyStopPatience: 2, earlyStopMinDelta: -0.5 }, /early-stop min delta -0\.5/],
        [{ earlyStopPatience: 2, earlyStopEvery: 2.5 }, /early-stop every 2\.5/],
        [{ earlyStopPatience: 3, earlyStopEvery: 80 }, /every 80 steps cannot stop a 240-step fork before its end/],
      ] as [Record<string, unknown>, RegExp][]) {
        const r = await h.request('fork', { run: 'main', select: 'all', budgetSteps: 240, lrMul: 1, adaptersRank: 0, ...params });
        assert.equal(!r.ok && r.error.codeName, 'INVALID_ARGUMENT', JSON.stringify(params));
        assert.match(!r.ok ? r.error.message : '', re);
      }
      // The same check when the relay is called directly.
      await assert.rejects(
        h.relay.dispatch('fork', { run: 'main', select: 'all', budgetSteps: 240, lrMul: 1, adaptersRank: 0, variants: 1, raceMode: 'sync' }),
        (e: unknown) => e instanceof RpcError && e.codeName === 'INVALID_ARGUMENT' && /race options need 2 or more variants/.test(e.message),
      );
      await assert.rejects(
        h.relay.dispatch('fork', { run: 'main', select: 'all', budgetSteps: 30, lrMul: 1, adaptersRank: 0, earlyStopPatience: 10 }),
        (e: unknown) => e instanceof RpcError && e.codeName === 'INVALID_ARGUMENT' && /early-stop patience 10 with an evaluation every 3 steps cannot stop a 30-step fork/.test(e.message),
      );
      await assert.rejects(
        h.relay.dispatch('fork', { run: 'main', select: 'all', budgetSteps: 30, lrMul: 1, adaptersRank: 0, earlyStopEvery: 5 }),
        (e: unknown) => e instanceof RpcError && e.codeName === 'INVALID_ARGUMENT' && /need a patience/.test(e.message),
      );
      assert.equal(sup.calls.filter((c) => c.method === 'Fork').length, forks, 'no Fork RPC for a bad race or early stop');

      const stop = await h.request('stop', { run: 'main' });
      assert.equal(!stop.ok && stop.error.codeName, 'FAILED_PRECONDITION');

      const merge = await h.request('merge', { method: 'swa', runs: ['main'] });
      assert.equal(!merge.ok && merge.error.codeName, 'UNIMPLEMENTED', 'an RPC the supervisor lacks is UNIMPLEMENTED');

      const badId = 9999;
      await h.relay.handle({ type: 'request', id: badId, method: 'pause', params: { run: 7 } });
      const bad = h.posted.find((m) => m.type === MessageType.Response && m.id === badId);
      assert.equal(bad?.type === MessageType.Response && !bad.ok && bad.error.codeName, 'INVALID_ARGUMENT');

      h.dialogPaths.push(path.join(dir, 'slice.csv'));
      const exp = await h.request('exportSlice', { run: 'main', select: 'quantile:0.9:1.0', format: 'csv' });
      assert.ok(exp.ok);
      assert.deepEqual({ ...sup.lastCall('ExportSlice') }, { run: 'main', select: 'quantile:0.9:1.0', format: 'csv', path: path.join(dir, 'slice.csv'), force: true });

      const before = sup.calls.length;
      h.dialogPaths.push(undefined);
      const cancelled = await h.request('exportSlice', { run: 'main', select: 'all', format: 'json' });
      assert.ok(cancelled.ok && cancelled.result === null, 'a cancelled dialog is a null result');
      assert.equal(sup.calls.length, before, 'and no RPC');

      await h.relay.handle({ type: 'notify', level: 'warning', text: 'hello' });
      assert.deepEqual(h.notified, ['hello']);
    } finally {
      h.dispose();
    }
  });

  it('reconnects after the supervisor goes away and replays from the last sequence number', async () => {
    const first = await fake('s3', [ev(1), ev(2), ev(3)]);
    first.writeConnection(file);
    const h = new Harness(file);
    try {
      await waitFor('events 1-3', () => h.eventSeqs().length === 3);
      first.stop();
      await waitFor('reconnecting', () => h.watcher.connection.state === 'reconnecting');

      // The supervisor comes back on another port (e.g. `onthefly serve`), with more events.
      const second = track(await fake('s3', [ev(1), ev(2), ev(3), ev(4), ev(5)]));
      second.writeConnection(file);
      await waitFor('connected again', () => h.watcher.connection.state === 'connected', 8000);
      await waitFor('events 4,5', () => h.eventSeqs().length === 5);
      assert.deepEqual(h.eventSeqs(), [1, 2, 3, 4, 5], 'nothing lost, nothing twice');
      assert.deepEqual(second.watchFromSeqs, [3], 'resumed from the last seen seq');
    } finally {
      h.dispose();
    }
  });

  it('a new session id resets the sequence and tells the view', async () => {
    const old = track(await fake('old', [ev(1), ev(2)]));
    old.writeConnection(file);
    const h = new Harness(file);
    try {
      await waitFor('events', () => h.eventSeqs().length === 2);
      const next = track(await fake('new', [ev(1, 'log', { text: 'new session' })]));
      next.writeConnection(file);
      await waitFor('session changed', () => h.posted.find((m) => m.type === MessageType.SessionChanged));
      await waitFor('new session events', () => next.watchFromSeqs.length > 0);
      assert.deepEqual(next.watchFromSeqs, [0]);
      assert.equal(h.watcher.connection.sessionId, 'new');
    } finally {
      h.dispose();
    }
  });

  it('a wrong token is reported while it keeps retrying', async () => {
    const sup = track(await fake('s4'));
    sup.writeConnection(file, 'stale');
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
    const probe = await fake('done-session');
    probe.stop();
    probe.writeConnection(file, TOKEN, 999_999);
    const h = new Harness(file, { isPidAlive: () => false });
    try {
      await waitFor('finished', () => h.watcher.connection.state === 'finished');
      assert.match(h.watcher.connection.message, /session done-session finished; read-only views need a live supervisor: run `onthefly serve done-session`/);
    } finally {
      h.dispose();
    }
  });
});
