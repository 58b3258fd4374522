/**
 * The whole host <-> webview contract.
 *
 * The webview is only a view: it asks the host for data with `Request` messages (one
 * per ControlService RPC it needs, answered by a `Response` with the same `id`), and
 * the host pushes what happens in the session (`Connection`, `Events`, `SessionChanged`).
 * The host owns the gRPC client and the session state.
 *
 * Everything crossing the boundary is plain JSON: VS Code serialises webview messages,
 * so NaN/Infinity would silently become null. Numbers that may be undefined on the wire
 * (a never-evaluated val loss is NaN in the proto) are therefore `number | null` here.
 *
 * This module imports neither `vscode` nor the DOM.
 */
import { type ForkEarlyStop, type ForkRace, validateForkEarlyStop, validateForkRace } from './fork';

/** Message types, grouped by direction. */
export enum MessageType {
  // webview -> host
  /** The webview loaded (or reloaded) and wants the current state. */
  Ready = 'ready',
  /** A request/reply call; answered by exactly one `Response` with the same id. */
  Request = 'request',
  /** Something the host should show to the user natively (e.g. an error notification). */
  Notify = 'notify',

  // host -> webview
  /** The answer to a `Request`. */
  Response = 'response',
  /** The connection to the supervisor changed (searching, connected, finished...). */
  Connection = 'connection',
  /** Session events in sequence order (live, or replayed after a reconnect). */
  Events = 'events',
  /** A different session is now live: drop everything shown and start over. */
  SessionChanged = 'sessionChanged',
}

// ---------------------------------------------------------------------------
// Data transfer objects (plain JSON; camelCase; NaN -> null)
// ---------------------------------------------------------------------------

export type RunStatusName = 'unspecified' | 'pending' | 'running' | 'paused' | 'completed' | 'failed' | 'stopped';

export type WorkerStateName =
  | 'unspecified'
  | 'starting'
  | 'attached'
  | 'running'
  | 'paused'
  | 'stopping'
  | 'succeeded'
  | 'failed'
  | 'stopped';

export interface RunDto {
  runId: string;
  name: string;
  /** "main" | "fork" | "merge" | "moe" */
  kind: string;
  status: RunStatusName;
  parents: string[];
  step: number;
  epoch: number;
  lastLoss: number | null;
  valLoss: number | null;
  testLoss: number | null;
  sampleSteps: number;
  created: number;
  ended: number;
  lastCheckpoint: string;
  /** Root cause when failed; empty otherwise. */
  error: string;
}

export interface WorkerDto {
  workerId: string;
  runId: string;
  role: string;
  state: WorkerStateName;
  pid: number;
  attempt: number;
  gpu: string;
  step: number;
  epoch: number;
  lastSeen: number;
  exitCode: number;
  exitSignal: string;
}

/** One GPU of the host (SessionStatus.gpus). */
export interface GpuDto {
  index: number;
  name: string;
  /** percent */
  utilization: number;
  memoryUsedMb: number;
  memoryTotalMb: number;
}

export interface StatusDto {
  sessionId: string;
  sessionDir: string;
  script: string;
  argv: string[];
  started: number;
  automode: boolean;
  workers: WorkerDto[];
  runs: RunDto[];
  /** Empty on a CPU run. */
  gpus: GpuDto[];
  lastEventSeq: number;
  /** "running" | "idle" | "finished" | "failed" */
  state: string;
  port: number;
}

export interface MetricSeriesDto {
  runId: string;
  key: string;
  steps: number[];
  values: (number | null)[];
  /** Points in the requested range before the supervisor downsampled them. */
  totalPoints: number;
}

export interface DistributionDto {
  runId: string;
  epoch: number;
  binEdges: number[];
  counts: number[];
  p50: number | null;
  p90: number | null;
  p99: number | null;
  mean: number | null;
  seen: number;
  total: number;
  epochs: number[];
}

export interface ActionDto {
  ok: boolean;
  message: string;
  runId: string;
  /** payload_json, parsed (null when empty or not JSON). */
  payload: unknown;
}

export interface PlanDto {
  planId: string;
  /** fork | merge | stabilize | explore | gate */
  action: string;
  reason: string;
  /** proposed | approved | rejected | executing | done | failed */
  status: string;
  selection: string;
  recipe: Record<string, unknown>;
  budgetSteps: number;
  cooldownSteps: number;
  diagnostics: Record<string, unknown>;
  created: number;
  runId: string;
}

export interface HealthVerdictDto {
  check: string;
  /** ok | warn | fail */
  verdict: string;
  hint: string;
  numbers: Record<string, unknown>;
}

export interface HealthDto {
  runId: string;
  verdicts: HealthVerdictDto[];
}

export interface ComparisonDto {
  runs: string[];
  slices: string[];
  /** losses[r][s]: mean loss of run r on slice s. */
  losses: (number | null)[][];
}

export interface ExportDto {
  ok: boolean;
  path: string;
  rows: number;
  message: string;
  sha256: string;
}

/** One session event (ControlService.WatchEvents); `payload` is payload_json parsed. */
export interface EventDto {
  seq: number;
  time: number;
  kind: string;
  runId: string;
  payload: Record<string, unknown>;
}

export type ConnectionState =
  /** No connection.json yet (no session started in this workspace). */
  | 'searching'
  /** Found a connection file; trying the supervisor. */
  | 'connecting'
  | 'connected'
  /** Lost the supervisor (or it did not answer); retrying with backoff. */
  | 'reconnecting'
  /** The session's supervisor is gone: the session is finished (read-only). */
  | 'finished';

export interface ConnectionDto {
  state: ConnectionState;
  /** Human-readable explanation of the state (shown in the header). */
  message: string;
  sessionId: string;
  connectionFile: string;
  address: string;
  /** Highest event sequence number seen so far. */
  lastSeq: number;
  /** Milliseconds until the next attempt while reconnecting; 0 otherwise. */
  retryInMs: number;
}

// ---------------------------------------------------------------------------
// Request/reply methods
// ---------------------------------------------------------------------------

export interface RunParams {
  /** Run id or name; empty = "main". */
  run: string;
}

/**
 * A fork, or a race of fork variants (ForkRace: variants, variantLrMuls, raceEta,
 * raceMetric, raceMode), optionally stopping early (ForkEarlyStop: earlyStopPatience,
 * earlyStopMetric, earlyStopMinDelta, earlyStopEvery; 0/unset patience = off) —
 * shared/fork.ts has their rules.
 */
export interface ForkParams extends ForkRace, ForkEarlyStop {
  run: string;
  /** SPEC: all | quantile:LO:HI | kmeans:auto[:cluster=K] | indices:FILE */
  select: string;
  budgetSteps: number;
  lrMul: number;
  adaptersRank: number;
  wdMul?: number;
  name?: string;
}

export type MergeMethod = 'swa' | 'distill' | 'fisher_soup' | 'adapter_fuse';
export const MERGE_METHODS: readonly MergeMethod[] = ['swa', 'distill', 'fisher_soup', 'adapter_fuse'];

export type HealthCheckName = 'determinism' | 'numerics' | 'gradients' | 'activations' | 'data' | 'throughput';
export const HEALTH_CHECKS: readonly HealthCheckName[] = [
  'determinism',
  'numerics',
  'gradients',
  'activations',
  'data',
  'throughput',
];

export type ExportFormat = 'csv' | 'parquet' | 'json';
export const EXPORT_FORMATS: readonly ExportFormat[] = ['csv', 'parquet', 'json'];

/** Every method the webview may call: its parameters and its result. */
export interface Methods {
  getStatus: { params: Record<string, never>; result: StatusDto };
  listRuns: { params: Record<string, never>; result: RunDto[] };
  getMetrics: {
    params: { run: string; key: string; fromStep?: number; toStep?: number; maxPoints?: number };
    result: MetricSeriesDto;
  };
  getLossDistribution: {
    params: { run: string; epoch?: number; bins?: number; select?: string };
    result: DistributionDto;
  };
  pause: { params: RunParams; result: ActionDto };
  resume: { params: RunParams; result: ActionDto };
  test: { params: RunParams; result: ActionDto };
  stop: { params: RunParams; result: ActionDto };
  fork: { params: ForkParams; result: ActionDto };
  gate: { params: { runs: string[]; name?: string }; result: ActionDto };
  merge: { params: { method: MergeMethod; runs: string[]; name?: string }; result: ActionDto };
  setAutomode: { params: { enabled: boolean }; result: ActionDto };
  listPlans: { params: { status?: string }; result: PlanDto[] };
  approvePlan: { params: { planId: string }; result: ActionDto };
  rejectPlan: { params: { planId: string }; result: ActionDto };
  editPlan: { params: { planId: string; values: Record<string, string> }; result: ActionDto };
  runHealthCheck: { params: { run: string; check?: string }; result: HealthDto };
  compareExperts: { params: { runs: string[]; slices: string[] }; result: ComparisonDto };
  /** The host asks where to save; `null` when the user cancelled the dialog. */
  exportSlice: { params: { run: string; select: string; format: ExportFormat }; result: ExportDto | null };
  exportSession: { params: Record<string, never>; result: ExportDto | null };
  importSession: { params: Record<string, never>; result: ExportDto | null };
}

export type MethodName = keyof Methods;
export type ParamsOf<M extends MethodName> = Methods[M]['params'];
export type ResultOf<M extends MethodName> = Methods[M]['result'];

export const METHOD_NAMES: readonly MethodName[] = [
  'getStatus',
  'listRuns',
  'getMetrics',
  'getLossDistribution',
  'pause',
  'resume',
  'test',
  'stop',
  'fork',
  'gate',
  'merge',
  'setAutomode',
  'listPlans',
  'approvePlan',
  'rejectPlan',
  'editPlan',
  'runHealthCheck',
  'compareExperts',
  'exportSlice',
  'exportSession',
  'importSession',
];

/** Why a request failed: the gRPC status (code and name) and the server's message. */
export interface RpcErrorDto {
  /** gRPC status code (e.g. 12 for UNIMPLEMENTED); -1 for errors that are not gRPC's. */
  code: number;
  /** "UNIMPLEMENTED", "FAILED_PRECONDITION", "UNAVAILABLE", "TIMEOUT", "INTERNAL"... */
  codeName: string;
  message: string;
}

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------

export interface ReadyMessage {
  type: MessageType.Ready;
}

export interface RequestMessage<M extends MethodName = MethodName> {
  type: MessageType.Request;
  id: number;
  method: M;
  params: ParamsOf<M>;
}

export interface NotifyMessage {
  type: MessageType.Notify;
  level: 'info' | 'warning' | 'error';
  text: string;
}

export type WebviewToHost = ReadyMessage | RequestMessage | NotifyMessage;

export type ResponseMessage<M extends MethodName = MethodName> =
  | { type: MessageType.Response; id: number; ok: true; result: ResultOf<M> }
  | { type: MessageType.Response; id: number; ok: false; error: RpcErrorDto };

export interface ConnectionMessage {
  type: MessageType.Connection;
  connection: ConnectionDto;
}

export interface EventsMessage {
  type: MessageType.Events;
  events: EventDto[];
  /** True when these events were replayed from the host's buffer for a (re)loaded view. */
  replay: boolean;
}

export interface SessionChangedMessage {
  type: MessageType.SessionChanged;
  sessionId: string;
}

export type HostToWebview = ResponseMessage | ConnectionMessage | EventsMessage | SessionChangedMessage;

// ---------------------------------------------------------------------------
// Encoding / decoding. Neither side trusts the other's messages blindly: the host
// validates what the webview sends before it turns it into an RPC.
// ---------------------------------------------------------------------------

export class ProtocolError extends Error {
  override name = 'ProtocolError';
}

/** A number that survives JSON: NaN and ±Infinity become null. */
export function finiteOrNull(x: number | null | undefined): number | null {
  return typeof x === 'number' && Number.isFinite(x) ? x : null;
}

/** Serialises a message for postMessage. Throws if it contains a non-finite number. */
export function encodeMessage(msg: WebviewToHost | HostToWebview): string {
  return JSON.stringify(msg, (_key, value: unknown) => {
    if (typeof value === 'number' && !Number.isFinite(value)) {
      throw new ProtocolError(`non-finite number in a ${msg.type} message; map it to null first`);
    }
    return value;
  });
}

function isRecord(x: unknown): x is Record<string, unknown> {
  return typeof x === 'object' && x !== null && !Array.isArray(x);
}

function str(o: Record<string, unknown>, key: string, where: string, optional = false): void {
  const v = o[key];
  if (v === undefined && optional) return;
  if (typeof v !== 'string') throw new ProtocolError(`${where}: "${key}" must be a string`);
}

function num(o: Record<string, unknown>, key: string, where: string, optional = false): void {
  const v = o[key];
  if (v === undefined && optional) return;
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new ProtocolError(`${where}: "${key}" must be a finite number`);
}

function numArray(o: Record<string, unknown>, key: string, where: string, optional = false): void {
  const v = o[key];
  if (v === undefined && optional) return;
  if (!Array.isArray(v) || v.some((x) => typeof x !== 'number' || !Number.isFinite(x))) {
    throw new ProtocolError(`${where}: "${key}" must be an array of finite numbers`);
  }
}

function strArray(o: Record<string, unknown>, key: string, where: string): void {
  const v = o[key];
  if (!Array.isArray(v) || v.some((s) => typeof s !== 'string')) {
    throw new ProtocolError(`${where}: "${key}" must be an array of strings`);
  }
}

/** Validates the parameters of each method (the host turns them into RPC requests). */
function checkParams(method: MethodName, p: Record<string, unknown>): void {
  const where = `request ${method}`;
  switch (method) {
    case 'getStatus':
    case 'listRuns':
    case 'exportSession':
    case 'importSession':
      return;
    case 'getMetrics':
      str(p, 'run', where);
      str(p, 'key', where);
      num(p, 'fromStep', where, true);
      num(p, 'toStep', where, true);
      num(p, 'maxPoints', where, true);
      return;
    case 'getLossDistribution':
      str(p, 'run', where);
      num(p, 'epoch', where, true);
      num(p, 'bins', where, true);
      str(p, 'select', where, true);
      return;
    case 'pause':
    case 'resume':
    case 'test':
    case 'stop':
      str(p, 'run', where);
      return;
    case 'fork': {
      str(p, 'run', where);
      str(p, 'select', where);
      num(p, 'budgetSteps', where);
      num(p, 'lrMul', where);
      num(p, 'adaptersRank', where);
      num(p, 'wdMul', where, true);
      num(p, 'variants', where, true);
      str(p, 'name', where, true);
      numArray(p, 'variantLrMuls', where, true);
      num(p, 'raceEta', where, true);
      str(p, 'raceMetric', where, true);
      str(p, 'raceMode', where, true);
      num(p, 'earlyStopPatience', where, true);
      str(p, 'earlyStopMetric', where, true);
      num(p, 'earlyStopMinDelta', where, true);
      num(p, 'earlyStopEvery', where, true);
      const bad = validateForkRace(p as ForkRace) ?? validateForkEarlyStop(p as ForkEarlyStop, p.budgetSteps as number);
      if (bad) throw new ProtocolError(`${where}: ${bad}`);
      return;
    }
    case 'gate':
      strArray(p, 'runs', where);
      str(p, 'name', where, true);
      return;
    case 'merge':
      str(p, 'method', where);
      if (!MERGE_METHODS.includes(p.method as MergeMethod)) {
        throw new ProtocolError(`${where}: method must be one of ${MERGE_METHODS.join(', ')}`);
      }
      strArray(p, 'runs', where);
      str(p, 'name', where, true);
      return;
    case 'setAutomode':
      if (typeof p.enabled !== 'boolean') throw new ProtocolError(`${where}: "enabled" must be a boolean`);
      return;
    case 'listPlans':
      str(p, 'status', where, true);
      return;
    case 'approvePlan':
    case 'rejectPlan':
      str(p, 'planId', where);
      return;
    case 'editPlan': {
      str(p, 'planId', where);
      const values = p.values;
      if (!isRecord(values) || Object.values(values).some((v) => typeof v !== 'string')) {
        throw new ProtocolError(`${where}: "values" must map keys to strings`);
      }
      return;
    }
    case 'runHealthCheck':
      str(p, 'run', where);
      str(p, 'check', where, true);
      return;
    case 'compareExperts':
      strArray(p, 'runs', where);
      strArray(p, 'slices', where);
      return;
    case 'exportSlice':
      str(p, 'run', where);
      str(p, 'select', where);
      if (!EXPORT_FORMATS.includes(p.format as ExportFormat)) {
        throw new ProtocolError(`${where}: format must be one of ${EXPORT_FORMATS.join(', ')}`);
      }
      return;
  }
}

/** Decodes (and validates) a message from the webview. Accepts an object or its JSON text. */
export function decodeWebviewMessage(raw: unknown): WebviewToHost {
  const msg: unknown = typeof raw === 'string' ? JSON.parse(raw) : raw;
  if (!isRecord(msg)) throw new ProtocolError('message must be an object');
  switch (msg.type) {
    case MessageType.Ready:
      return { type: MessageType.Ready };
    case MessageType.Notify: {
      if (msg.level !== 'info' && msg.level !== 'warning' && msg.level !== 'error') {
        throw new ProtocolError('notify: level must be info, warning or error');
      }
      str(msg, 'text', 'notify');
      return { type: MessageType.Notify, level: msg.level, text: msg.text as string };
    }
    case MessageType.Request: {
      if (typeof msg.id !== 'number' || !Number.isInteger(msg.id)) throw new ProtocolError('request: "id" must be an integer');
      if (typeof msg.method !== 'string' || !METHOD_NAMES.includes(msg.method as MethodName)) {
        throw new ProtocolError(`request: unknown method ${JSON.stringify(msg.method)}`);
      }
      const params = msg.params === undefined ? {} : msg.params;
      if (!isRecord(params)) throw new ProtocolError(`request ${msg.method}: "params" must be an object`);
      checkParams(msg.method as MethodName, params);
      return { type: MessageType.Request, id: msg.id, method: msg.method as MethodName, params: params as never };
    }
    default:
      throw new ProtocolError(`unknown message type ${JSON.stringify(msg.type)}`);
  }
}

/** Decodes a message from the host (the webview side). Returns undefined for foreign messages. */
export function decodeHostMessage(raw: unknown): HostToWebview | undefined {
  const msg: unknown = typeof raw === 'string' ? JSON.parse(raw) : raw;
  if (!isRecord(msg)) return undefined;
  switch (msg.type) {
    case MessageType.Response:
      if (typeof msg.id !== 'number' || typeof msg.ok !== 'boolean') return undefined;
      if (!msg.ok && !isRecord(msg.error)) return undefined;
      return msg as unknown as ResponseMessage;
    case MessageType.Connection:
      return isRecord(msg.connection) ? (msg as unknown as ConnectionMessage) : undefined;
    case MessageType.Events:
      return Array.isArray(msg.events) ? (msg as unknown as EventsMessage) : undefined;
    case MessageType.SessionChanged:
      return typeof msg.sessionId === 'string' ? (msg as unknown as SessionChangedMessage) : undefined;
    default:
      return undefined;
  }
}

/** Builds a request message (the webview side). */
export function makeRequest<M extends MethodName>(id: number, method: M, params: ParamsOf<M>): RequestMessage<M> {
  return { type: MessageType.Request, id, method, params };
}

/** What the user calls each method (toasts, logs). */
export const METHOD_LABELS: Record<MethodName, string> = {
  getStatus: 'Session status',
  listRuns: 'Runs',
  getMetrics: 'Metrics',
  getLossDistribution: 'Loss distribution',
  pause: 'Pause',
  resume: 'Resume',
  test: 'Test',
  stop: 'Stop',
  fork: 'Fork',
  gate: 'Gate',
  merge: 'Merge',
  setAutomode: 'Automode',
  listPlans: 'Plans',
  approvePlan: 'Approve plan',
  rejectPlan: 'Reject plan',
  editPlan: 'Edit plan',
  runHealthCheck: 'Health check',
  compareExperts: 'Compare experts',
  exportSlice: 'Export slice',
  exportSession: 'Export session',
  importSession: 'Import session',
};

/** One-line description of an RPC error for a toast: "Fork failed: UNIMPLEMENTED: fork is not built yet". */
export function describeError(method: string, err: RpcErrorDto): string {
  const label = METHOD_LABELS[method as MethodName] ?? method.charAt(0).toUpperCase() + method.slice(1);
  return `${label} failed: ${err.codeName}${err.message ? `: ${err.message}` : ''}`;
}
