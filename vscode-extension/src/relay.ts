/**
 * The host-side relay between one webview and the session: webview requests become
 * ControlService RPCs (the same ones the CLI calls), session events and connection
 * changes become webview messages. Every request gets exactly one response — an RPC
 * error (UNIMPLEMENTED, FAILED_PRECONDITION, a timeout...) comes back as data the view
 * shows, never as silence.
 *
 * No vscode import: the extension wires it to a WebviewPanel (panel.ts), the browser
 * end-to-end test wires it to a page in headless Chromium.
 */
import * as path from 'node:path';
import { validateForkEarlyStop, validateForkRace } from '../shared/fork';
import {
  type ConnectionDto,
  type EventDto,
  type HostToWebview,
  MessageType,
  type MethodName,
  type ParamsOf,
  type ResultOf,
  type RequestMessage,
  type WebviewToHost,
  decodeWebviewMessage,
} from '../shared/protocol';
import type { ControlClient } from './client';
import { RpcError } from './client';
import {
  actionFromProto,
  comparisonFromProto,
  distributionFromProto,
  exportFromProto,
  healthFromProto,
  metricsFromProto,
  planFromProto,
  runFromProto,
  statusFromProto,
} from './convert';
import type { Disposable, Emitter } from './session';

/** What the relay needs from the session (SessionWatcher implements it). */
export interface SessionSource {
  readonly connection: ConnectionDto;
  requireClient(): ControlClient;
  recentEvents(): EventDto[];
  readonly onConnection: Emitter<ConnectionDto>;
  readonly onEvents: Emitter<EventDto[]>;
  readonly onSessionChanged: Emitter<string>;
}

export interface FileFilter {
  [name: string]: string[];
}

/** Native dialogs (vscode.window.show*Dialog in the extension; canned paths in tests). */
export interface Dialogs {
  saveFile(opts: { title: string; defaultName: string; filters: FileFilter }): Promise<string | undefined>;
  openFile(opts: { title: string; filters: FileFilter }): Promise<string | undefined>;
  notify(level: 'info' | 'warning' | 'error', text: string): void;
}

export type Post = (msg: HostToWebview) => unknown;

/** Deadlines per method (ms). Pause/stop wait for the worker's acknowledgement. */
const TIMEOUTS: Partial<Record<MethodName, number>> = {
  pause: 35_000,
  resume: 35_000,
  stop: 35_000,
  test: 35_000,
  runHealthCheck: 180_000,
  compareExperts: 120_000,
  exportSlice: 300_000,
  exportSession: 600_000,
  importSession: 600_000,
};

/** How long the supervisor should wait for a worker to acknowledge pause/resume/stop. */
const WAIT_S = 25;

function safeName(s: string): string {
  return s.replace(/[^A-Za-z0-9._-]+/g, '_').replace(/^_+|_+$/g, '') || 'slice';
}

export class Relay implements Disposable {
  private readonly subscriptions: Disposable[] = [];
  private disposed = false;

  constructor(
    private readonly session: SessionSource,
    private readonly post: Post,
    private readonly dialogs: Dialogs,
    private readonly log: (line: string) => void = () => undefined,
  ) {
    this.subscriptions.push(
      session.onConnection.on((connection) => this.send({ type: MessageType.Connection, connection })),
      session.onEvents.on((events) => this.send({ type: MessageType.Events, events, replay: false })),
      session.onSessionChanged.on((sessionId) => this.send({ type: MessageType.SessionChanged, sessionId })),
    );
  }

  dispose(): void {
    this.disposed = true;
    for (const s of this.subscriptions.splice(0)) s.dispose();
  }

  private send(msg: HostToWebview): void {
    if (this.disposed) return;
    try {
      const r = this.post(msg);
      // webview.postMessage returns a Thenable that rejects once the panel is gone.
      if (r && typeof (r as PromiseLike<unknown>).then === 'function') Promise.resolve(r).catch(() => undefined);
    } catch (e) {
      this.log(`post failed: ${(e as Error).message}`);
    }
  }

  /** Handles one message from the webview (validated first). */
  async handle(raw: unknown): Promise<void> {
    let msg: WebviewToHost;
    try {
      msg = decodeWebviewMessage(raw);
    } catch (e) {
      this.log(`dropped a malformed webview message: ${(e as Error).message}`);
      const id = (raw as { id?: unknown } | null)?.id;
      if (typeof id === 'number') {
        this.send({ type: MessageType.Response, id, ok: false, error: { code: 3, codeName: 'INVALID_ARGUMENT', message: (e as Error).message } });
      }
      return;
    }
    switch (msg.type) {
      case MessageType.Ready:
        this.send({ type: MessageType.Connection, connection: this.session.connection });
        this.send({ type: MessageType.Events, events: this.session.recentEvents(), replay: true });
        return;
      case MessageType.Notify:
        this.dialogs.notify(msg.level, msg.text);
        return;
      case MessageType.Request:
        await this.request(msg);
        return;
    }
  }

  private async request(msg: RequestMessage): Promise<void> {
    const started = Date.now();
    try {
      const result = await this.dispatch(msg.method, msg.params as never);
      this.send({ type: MessageType.Response, id: msg.id, ok: true, result: result as never });
      this.log(`${msg.method} ok in ${Date.now() - started} ms`);
    } catch (err) {
      const e = RpcError.from(err);
      this.log(`${msg.method} failed in ${Date.now() - started} ms: ${e.message}`);
      this.send({ type: MessageType.Response, id: msg.id, ok: false, error: e.toDto() });
    }
  }

  /** One webview method -> one ControlService RPC, converted to the protocol's DTOs. */
  async dispatch<M extends MethodName>(method: M, params: ParamsOf<M>): Promise<ResultOf<M>> {
    const ctl = this.session.requireClient();
    const timeoutMs = TIMEOUTS[method];
    const opts = timeoutMs ? { timeoutMs } : {};
    const p = params as Record<string, unknown>;
    const run = (p.run as string | undefined) ?? '';
    type R = ResultOf<M>;
    switch (method) {
      case 'getStatus':
        return statusFromProto(await ctl.call('GetStatus', {}, opts)) as R;
      case 'listRuns':
        return (await ctl.call('ListRuns', {}, opts)).runs.map(runFromProto) as R;
      case 'getMetrics': {
        const q = params as ParamsOf<'getMetrics'>;
        const reply = await ctl.call(
          'GetMetrics',
          { run: q.run, key: q.key, from_step: Math.max(0, Math.floor(q.fromStep ?? 0)), to_step: Math.max(0, Math.ceil(q.toStep ?? 0)), max_points: Math.max(0, Math.floor(q.maxPoints ?? 0)) },
          opts,
        );
        return metricsFromProto(reply) as R;
      }
      case 'getLossDistribution': {
        const q = params as ParamsOf<'getLossDistribution'>;
        const reply = await ctl.call('GetLossDistribution', { run: q.run, epoch: q.epoch ?? -1, bins: q.bins ?? 0, select: q.select ?? '' }, opts);
        return distributionFromProto(reply) as R;
      }
      case 'pause':
        return actionFromProto(await ctl.call('Pause', { run, wait: true, timeout_s: WAIT_S }, opts)) as R;
      case 'resume':
        return actionFromProto(await ctl.call('Resume', { run, wait: true, timeout_s: WAIT_S }, opts)) as R;
      case 'stop':
        return actionFromProto(await ctl.call('Stop', { run, wait: true, timeout_s: WAIT_S }, opts)) as R;
      case 'test':
        return actionFromProto(await ctl.call('Test', { run, wait: false }, opts)) as R;
      case 'fork': {
        const f = params as ParamsOf<'fork'>;
        // A race: explicit lr multipliers (their count is the variants) or a spread of
        // `variants` around lr_mul; 0 / '' leave eta, metric and mode to the supervisor's
        // defaults (2, slice, asha). Early stopping: patience 0 = off; '' / 0 leave metric,
        // min delta and cadence to the supervisor's defaults (slice, 0, budget/10).
        // handle() has checked both already (decodeWebviewMessage); a direct dispatch()
        // gets the same check.
        const bad = validateForkRace(f) ?? validateForkEarlyStop(f, f.budgetSteps);
        if (bad) throw new RpcError(3, 'INVALID_ARGUMENT', bad);
        const muls = f.variantLrMuls ?? [];
        const reply = await ctl.call(
          'Fork',
          {
            run: f.run,
            select: f.select,
            budget_steps: Math.max(0, Math.floor(f.budgetSteps)),
            lr_mul: f.lrMul,
            // Sent only when given: `optional double wd_mul` (unset = the supervisor's 1.0;
            // an explicit 0 means no weight decay there).
            ...(f.wdMul !== undefined ? { wd_mul: f.wdMul } : {}),
            adapters_rank: Math.max(0, Math.floor(f.adaptersRank)),
            variants: muls.length || (f.variants ?? 0),
            name: f.name ?? '',
            variant_lr_muls: muls,
            race_eta: f.raceEta ?? 0,
            race_metric: f.raceMetric ?? '',
            race_mode: f.raceMode ?? '',
            early_stop_patience: Math.max(0, Math.floor(f.earlyStopPatience ?? 0)),
            early_stop_metric: f.earlyStopMetric ?? '',
            early_stop_min_delta: f.earlyStopMinDelta ?? 0,
            early_stop_every: Math.max(0, Math.floor(f.earlyStopEvery ?? 0)),
          },
          opts,
        );
        return actionFromProto(reply) as R;
      }
      case 'gate': {
        const g = params as ParamsOf<'gate'>;
        return actionFromProto(await ctl.call('TrainGate', { runs: g.runs, name: g.name ?? '' }, opts)) as R;
      }
      case 'merge': {
        const m = params as ParamsOf<'merge'>;
        return actionFromProto(await ctl.call('Merge', { method: m.method, runs: m.runs, name: m.name ?? '' }, opts)) as R;
      }
      case 'setAutomode':
        return actionFromProto(await ctl.call('SetAutomode', { enabled: (params as ParamsOf<'setAutomode'>).enabled }, opts)) as R;
      case 'listPlans':
        return (await ctl.call('ListPlans', { status: (params as ParamsOf<'listPlans'>).status ?? '' }, opts)).plans.map(planFromProto) as R;
      case 'approvePlan':
        return actionFromProto(await ctl.call('ApprovePlan', { plan_id: (params as ParamsOf<'approvePlan'>).planId }, opts)) as R;
      case 'rejectPlan':
        return actionFromProto(await ctl.call('RejectPlan', { plan_id: (params as ParamsOf<'rejectPlan'>).planId }, opts)) as R;
      case 'editPlan': {
        const e = params as ParamsOf<'editPlan'>;
        return actionFromProto(await ctl.call('EditPlan', { plan_id: e.planId, values: e.values }, opts)) as R;
      }
      case 'runHealthCheck': {
        const h = params as ParamsOf<'runHealthCheck'>;
        return healthFromProto(await ctl.call('RunHealthCheck', { run: h.run, check: h.check ?? '' }, opts)) as R;
      }
      case 'compareExperts': {
        const c = params as ParamsOf<'compareExperts'>;
        return comparisonFromProto(await ctl.call('CompareExperts', { runs: c.runs, slices: c.slices }, opts)) as R;
      }
      case 'exportSlice': {
        const x = params as ParamsOf<'exportSlice'>;
        const ext = x.format;
        const target = await this.dialogs.saveFile({
          title: `Export ${x.select} of ${x.run || 'main'} as ${ext.toUpperCase()}`,
          defaultName: `${safeName(x.run || 'main')}-${safeName(x.select)}.${ext}`,
          filters: { [ext.toUpperCase()]: [ext] },
        });
        if (!target) return null as R;
        return exportFromProto(await ctl.call('ExportSlice', { run: x.run, select: x.select, format: x.format, path: target, force: true }, opts)) as R;
      }
      case 'exportSession': {
        const sessionId = this.session.connection.sessionId || 'session';
        const target = await this.dialogs.saveFile({
          title: 'Export the OnTheFly session',
          defaultName: `onthefly-${safeName(sessionId)}.tar.gz`,
          filters: { 'OnTheFly session archive': ['gz', 'tgz', 'tar', 'zip'] },
        });
        if (!target) return null as R;
        return exportFromProto(await ctl.call('ExportSession', { session: '', path: target, force: true }, opts)) as R;
      }
      case 'importSession': {
        const source = await this.dialogs.openFile({
          title: 'Import an OnTheFly session archive',
          filters: { 'OnTheFly session archive': ['gz', 'tgz', 'tar', 'zip'] },
        });
        if (!source) return null as R;
        return exportFromProto(await ctl.call('ImportSession', { path: path.resolve(source) }, opts)) as R;
      }
    }
    throw new RpcError(12, 'UNIMPLEMENTED', `the dashboard has no mapping for ${String(method)}`);
  }
}
