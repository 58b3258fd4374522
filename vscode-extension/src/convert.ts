/**
 * Protobuf messages stop here: proto-loader objects -> the plain DTOs of
 * shared/protocol.ts (camelCase, NaN -> null, *_json parsed). The only module of the
 * host that knows both shapes. No vscode import (the relay and the tests use it).
 */
import type {
  ActionDto,
  ComparisonDto,
  DistributionDto,
  EventDto,
  ExportDto,
  HealthDto,
  MetricSeriesDto,
  PlanDto,
  RunDto,
  RunStatusName,
  StatusDto,
  WorkerDto,
  WorkerStateName,
} from '../shared/protocol';
import { finiteOrNull } from '../shared/protocol';
import type {
  PActionReply,
  PComparison,
  PEvent,
  PExportReply,
  PHealthReport,
  PLossDistribution,
  PMetricSeries,
  PPlanCard,
  PRunInfo,
  PSessionStatus,
  PWorkerInfo,
} from './protoTypes';

/** "RUN_STATUS_PAUSED" -> "paused" (also accepts the enum's number). */
export function runStatusName(x: string | number): RunStatusName {
  const names: RunStatusName[] = ['unspecified', 'pending', 'running', 'paused', 'completed', 'failed', 'stopped'];
  if (typeof x === 'number') return names[x] ?? 'unspecified';
  const s = x.replace(/^RUN_STATUS_/, '').toLowerCase() as RunStatusName;
  return names.includes(s) ? s : 'unspecified';
}

/** "WORKER_STATE_PAUSED" -> "paused". */
export function workerStateName(x: string | number): WorkerStateName {
  const names: WorkerStateName[] = [
    'unspecified',
    'starting',
    'attached',
    'running',
    'paused',
    'stopping',
    'succeeded',
    'failed',
    'stopped',
  ];
  if (typeof x === 'number') return names[x] ?? 'unspecified';
  const s = x.replace(/^WORKER_STATE_/, '').toLowerCase() as WorkerStateName;
  return names.includes(s) ? s : 'unspecified';
}

/** "ROLE_FORK" -> "fork". */
export function roleName(x: string | number): string {
  if (typeof x === 'number') return ['unspecified', 'train', 'fork', 'merge', 'health', 'standby'][x] ?? 'unspecified';
  return x.replace(/^ROLE_/, '').toLowerCase();
}

/** Parses a `*_json` field; null when empty or not JSON (never throws). */
export function parseJson(text: string | undefined): unknown {
  if (!text) return null;
  try {
    return sanitize(JSON.parse(text));
  } catch {
    return null;
  }
}

function parseJsonObject(text: string | undefined): Record<string, unknown> {
  const v = parseJson(text);
  return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : {};
}

/** JSON from Python may carry NaN/Infinity (json.dumps allows them): map them to null. */
function sanitize(v: unknown): unknown {
  if (typeof v === 'number') return Number.isFinite(v) ? v : null;
  if (Array.isArray(v)) return v.map(sanitize);
  if (typeof v === 'object' && v !== null) {
    const out: Record<string, unknown> = {};
    for (const [k, x] of Object.entries(v)) out[k] = sanitize(x);
    return out;
  }
  return v;
}

/**
 * Python's json.dumps writes NaN / Infinity / -Infinity, which JSON.parse rejects.
 * Replace them (outside strings) with null before parsing.
 */
export function parsePythonJson(text: string): unknown {
  try {
    return sanitize(JSON.parse(text));
  } catch {
    const fixed = text.replace(/("(?:[^"\\]|\\.)*")|-?\bInfinity\b|\bNaN\b/g, (_m, str: string | undefined) => str ?? 'null');
    try {
      return sanitize(JSON.parse(fixed));
    } catch {
      return null;
    }
  }
}

const n = (x: number | undefined): number => (typeof x === 'number' && Number.isFinite(x) ? x : 0);

export function runFromProto(r: PRunInfo): RunDto {
  return {
    runId: r.run_id,
    name: r.name || r.run_id,
    kind: r.kind,
    status: runStatusName(r.status),
    parents: r.parents ?? [],
    step: n(r.step),
    epoch: n(r.epoch),
    lastLoss: finiteOrNull(r.last_loss),
    valLoss: finiteOrNull(r.val_loss),
    testLoss: finiteOrNull(r.test_loss),
    sampleSteps: n(r.sample_steps),
    created: n(r.created),
    ended: n(r.ended),
    lastCheckpoint: r.last_checkpoint ?? '',
    error: r.error ?? '',
  };
}

export function workerFromProto(w: PWorkerInfo): WorkerDto {
  return {
    workerId: w.worker_id,
    runId: w.run_id,
    role: roleName(w.role),
    state: workerStateName(w.state),
    pid: n(w.pid),
    attempt: n(w.attempt),
    gpu: w.gpu ?? '',
    step: n(w.step),
    epoch: n(w.epoch),
    lastSeen: n(w.last_seen),
    exitCode: n(w.exit_code),
    exitSignal: w.exit_signal ?? '',
  };
}

export function statusFromProto(s: PSessionStatus): StatusDto {
  return {
    sessionId: s.session_id,
    sessionDir: s.session_dir,
    script: s.script,
    argv: s.argv ?? [],
    started: n(s.started),
    automode: !!s.automode,
    workers: (s.workers ?? []).map(workerFromProto),
    runs: (s.runs ?? []).map(runFromProto),
    gpus: (s.gpus ?? []).map((g) => ({
      index: n(g.index),
      name: g.name ?? '',
      utilization: n(g.utilization),
      memoryUsedMb: n(g.memory_used_mb),
      memoryTotalMb: n(g.memory_total_mb),
    })),
    lastEventSeq: n(s.last_event_seq),
    state: s.state,
    port: n(s.port),
  };
}

export function eventFromProto(e: PEvent): EventDto {
  const payload = e.payload_json ? parsePythonJson(e.payload_json) : {};
  return {
    seq: n(e.seq),
    time: n(e.time),
    kind: e.kind,
    runId: e.run_id ?? '',
    payload: typeof payload === 'object' && payload !== null && !Array.isArray(payload) ? (payload as Record<string, unknown>) : {},
  };
}

export function actionFromProto(a: PActionReply): ActionDto {
  return { ok: !!a.ok, message: a.message ?? '', runId: a.run_id ?? '', payload: parseJson(a.payload_json) };
}

export function metricsFromProto(m: PMetricSeries): MetricSeriesDto {
  const steps = m.steps ?? [];
  const values = (m.values ?? []).map((v) => finiteOrNull(v));
  const len = Math.min(steps.length, values.length);
  return {
    runId: m.run_id,
    key: m.key,
    steps: steps.slice(0, len).map(Number),
    values: values.slice(0, len),
    totalPoints: n(m.total_points),
  };
}

export function distributionFromProto(d: PLossDistribution): DistributionDto {
  return {
    runId: d.run_id,
    epoch: n(d.epoch),
    binEdges: (d.bin_edges ?? []).map((x) => (Number.isFinite(x) ? x : 0)),
    counts: (d.counts ?? []).map((x) => n(Number(x))),
    p50: finiteOrNull(d.p50),
    p90: finiteOrNull(d.p90),
    p99: finiteOrNull(d.p99),
    mean: finiteOrNull(d.mean),
    seen: n(d.seen),
    total: n(d.total),
    epochs: d.epochs ?? [],
  };
}

export function planFromProto(p: PPlanCard): PlanDto {
  return {
    planId: p.plan_id,
    action: p.action,
    reason: p.reason,
    status: p.status,
    selection: p.selection,
    recipe: parseJsonObject(p.recipe_json),
    budgetSteps: n(p.budget_steps),
    cooldownSteps: n(p.cooldown_steps),
    diagnostics: parseJsonObject(p.diagnostics_json),
    created: n(p.created),
    runId: p.run_id,
  };
}

export function healthFromProto(h: PHealthReport): HealthDto {
  return {
    runId: h.run_id,
    verdicts: (h.verdicts ?? []).map((v) => ({
      check: v.check,
      verdict: v.verdict,
      hint: v.hint,
      numbers: parseJsonObject(v.numbers_json),
    })),
  };
}

export function comparisonFromProto(c: PComparison): ComparisonDto {
  const runs = c.runs ?? [];
  const slices = c.slices ?? [];
  const flat = c.losses ?? [];
  const losses = runs.map((_, r) => slices.map((_, s) => finiteOrNull(flat[r * slices.length + s])));
  return { runs, slices, losses };
}

export function exportFromProto(e: PExportReply): ExportDto {
  return { ok: !!e.ok, path: e.path ?? '', rows: n(e.rows), message: e.message ?? '', sha256: e.sha256 ?? '' };
}
