/**
 * Typed views of session event payloads (the proto's `Event` comment is the source):
 *
 *   run_created {run}, run_status {run_id,status,message}, worker_state {worker},
 *   metrics {run_id, points:[{step,epoch,loss,lr,grad_norm,samples_per_s,...}]},
 *   samples {run_id, epoch, count, p50, p90, p99, mean, seen},
 *   epoch_end {...}, eval {...}, checkpoint {...}, log {worker_id, level, text},
 *   error {worker_id, message, traceback, filename, lineno}, plan {...},
 *   session {state, message}
 *
 * Payloads are JSON written by the supervisor; every accessor here tolerates missing or
 * mistyped fields (returns a default) so a newer supervisor never breaks the view.
 */
import type { EventDto } from './protocol';

export const EVENT_KINDS = [
  'run_created',
  'run_status',
  'worker_state',
  'metrics',
  'samples',
  'epoch_end',
  'eval',
  'checkpoint',
  'log',
  'error',
  'plan',
  'session',
] as const;

/** Step-metric keys carried by `metrics` events and served by GetMetrics. */
export const STEP_METRIC_KEYS = ['loss', 'lr', 'grad_norm', 'samples_per_s', 'step_time_ms', 'data_time_ms'] as const;

function numberOr(x: unknown, fallback: number): number {
  return typeof x === 'number' && Number.isFinite(x) ? x : fallback;
}

function numberOrNull(x: unknown): number | null {
  return typeof x === 'number' && Number.isFinite(x) ? x : null;
}

function stringOr(x: unknown, fallback = ''): string {
  return typeof x === 'string' ? x : fallback;
}

function record(x: unknown): Record<string, unknown> {
  return typeof x === 'object' && x !== null && !Array.isArray(x) ? (x as Record<string, unknown>) : {};
}

/** The run an event belongs to: Event.run_id, else payload.run_id. */
export function eventRunId(ev: EventDto): string {
  return ev.runId || stringOr(ev.payload.run_id);
}

export interface MetricPoint {
  step: number;
  epoch: number;
  /** key -> value; only finite values are present (NaN grad norm = not measured). */
  values: Record<string, number>;
}

/**
 * Points of a `metrics` event. Two payload shapes are accepted: the proto's documented
 * `points: [{step, epoch, loss, ...}]`, and the columnar `{step: [...], loss: [...], ...}`
 * (one array per key, the same length) that the supervisor publishes to keep events small.
 * Non-finite values (a NaN grad norm = not measured) and non-numeric fields are dropped;
 * `extra` scalars of row points are flattened.
 */
export function metricPoints(ev: EventDto): MetricPoint[] {
  const raw = ev.payload.points;
  if (Array.isArray(raw)) return rowPoints(raw);
  if (Array.isArray(ev.payload.step)) return columnPoints(ev.payload);
  return [];
}

const NOT_METRICS = new Set(['step', 'epoch', 'batch', 'time', 'run_id', 'points', 'extra']);

function rowPoints(raw: unknown[]): MetricPoint[] {
  const out: MetricPoint[] = [];
  for (const item of raw) {
    const p = record(item);
    const step = numberOrNull(p.step);
    if (step === null) continue;
    const values: Record<string, number> = {};
    for (const [k, v] of Object.entries(p)) {
      if (NOT_METRICS.has(k)) continue;
      if (typeof v === 'number' && Number.isFinite(v)) values[k] = v;
    }
    for (const [k, v] of Object.entries(record(p.extra))) {
      if (typeof v === 'number' && Number.isFinite(v) && !(k in values)) values[k] = v;
    }
    out.push({ step, epoch: numberOr(p.epoch, 0), values });
  }
  return out;
}

function columnPoints(payload: Record<string, unknown>): MetricPoint[] {
  const steps = payload.step as unknown[];
  const epochs = Array.isArray(payload.epoch) ? (payload.epoch as unknown[]) : [];
  const columns: [string, unknown[]][] = [];
  for (const [k, v] of Object.entries(payload)) {
    if (!NOT_METRICS.has(k) && Array.isArray(v) && v.length === steps.length) columns.push([k, v]);
  }
  const out: MetricPoint[] = [];
  for (let i = 0; i < steps.length; i++) {
    const step = numberOrNull(steps[i]);
    if (step === null) continue;
    const values: Record<string, number> = {};
    for (const [k, col] of columns) {
      const v = col[i];
      if (typeof v === 'number' && Number.isFinite(v)) values[k] = v;
    }
    out.push({ step, epoch: numberOr(epochs[i], 0), values });
  }
  return out;
}

export interface EvalPayload {
  split: string;
  step: number;
  epoch: number;
  loss: number | null;
  accuracy: number | null;
}

export function evalPayload(ev: EventDto): EvalPayload {
  const p = ev.payload;
  return {
    split: stringOr(p.split, 'val'),
    step: numberOr(p.step, 0),
    epoch: numberOr(p.epoch, 0),
    loss: numberOrNull(p.loss),
    accuracy: numberOrNull(p.accuracy),
  };
}

/** The chart points an `eval` event contributes: {val_loss, val_accuracy} for split "val", etc. */
export function evalMetricPoint(ev: EventDto): MetricPoint | null {
  const e = evalPayload(ev);
  const prefix = e.split === 'val' ? 'val' : e.split === 'test' ? 'test' : '';
  if (!prefix) return null;
  const values: Record<string, number> = {};
  if (e.loss !== null) values[`${prefix}_loss`] = e.loss;
  if (e.accuracy !== null) {
    values[`${prefix}_accuracy`] = e.accuracy;
    if (prefix === 'val') values.accuracy = e.accuracy;
  }
  return { step: e.step, epoch: e.epoch, values };
}

export interface LogPayload {
  workerId: string;
  level: string;
  text: string;
}

export function logPayload(ev: EventDto): LogPayload {
  const p = ev.payload;
  return { workerId: stringOr(p.worker_id), level: stringOr(p.level, 'info'), text: stringOr(p.text) };
}

export interface ErrorPayload {
  workerId: string;
  message: string;
  traceback: string;
  filename: string;
  lineno: number;
}

export function errorPayload(ev: EventDto): ErrorPayload {
  const p = ev.payload;
  return {
    workerId: stringOr(p.worker_id),
    message: stringOr(p.message, '(no message)'),
    traceback: stringOr(p.traceback),
    filename: stringOr(p.filename),
    lineno: numberOr(p.lineno, 0),
  };
}

/** "train.py:42" or "" when the worker did not say where. */
export function errorLocation(e: ErrorPayload): string {
  if (!e.filename) return '';
  return e.lineno > 0 ? `${e.filename}:${e.lineno}` : e.filename;
}

export interface SamplesPayload {
  epoch: number;
  count: number;
  p50: number | null;
  p90: number | null;
  p99: number | null;
  mean: number | null;
  seen: number;
}

export function samplesPayload(ev: EventDto): SamplesPayload {
  const p = ev.payload;
  return {
    epoch: numberOr(p.epoch, 0),
    count: numberOr(p.count, 0),
    p50: numberOrNull(p.p50),
    p90: numberOrNull(p.p90),
    p99: numberOrNull(p.p99),
    mean: numberOrNull(p.mean),
    seen: numberOr(p.seen, 0),
  };
}

export interface SessionPayload {
  state: string;
  message: string;
}

export function sessionPayload(ev: EventDto): SessionPayload {
  return { state: stringOr(ev.payload.state), message: stringOr(ev.payload.message) };
}

// `attached` and `finished` are published by the supervisor in addition to the proto's list.
const RUN_KINDS = new Set(['run_created', 'run_status', 'worker_state', 'epoch_end', 'eval', 'attached', 'finished', 'checkpoint']);

/** Kinds whose arrival may change the runs list / lineage. */
export function affectsRuns(kind: string): boolean {
  return RUN_KINDS.has(kind);
}

/** Kinds whose arrival may change the loss histogram. */
export function affectsDistribution(kind: string): boolean {
  return kind === 'samples' || kind === 'epoch_end';
}
