/**
 * The shapes @grpc/proto-loader gives us for onthefly.v1 messages, as loaded by
 * `client.ts` (keepCase: field names exactly as in the .proto; longs as numbers; enums
 * as their names; defaults filled in). Only what the extension uses is typed here;
 * `convert.ts` turns these into the plain DTOs of shared/protocol.ts.
 */

export interface PRunInfo {
  run_id: string;
  name: string;
  kind: string;
  status: string;
  parents: string[];
  step: number;
  epoch: number;
  last_loss: number;
  val_loss: number;
  test_loss: number;
  sample_steps: number;
  created: number;
  ended: number;
  config_json: string;
  last_checkpoint: string;
  error: string;
}

export interface PWorkerInfo {
  worker_id: string;
  run_id: string;
  role: string;
  state: string;
  pid: number;
  attempt: number;
  gpu: string;
  step: number;
  epoch: number;
  last_seen: number;
  exit_code: number;
  exit_signal: string;
}

export interface PGpuInfo {
  index: number;
  name: string;
  utilization: number;
  memory_used_mb: number;
  memory_total_mb: number;
  worker_ids: string[];
}

export interface PSessionStatus {
  session_id: string;
  session_dir: string;
  script: string;
  argv: string[];
  started: number;
  automode: boolean;
  workers: PWorkerInfo[];
  runs: PRunInfo[];
  gpus?: PGpuInfo[];
  last_event_seq: number;
  state: string;
  port: number;
}

export interface PEvent {
  seq: number;
  time: number;
  kind: string;
  run_id: string;
  payload_json: string;
}

export interface PActionReply {
  ok: boolean;
  message: string;
  run_id: string;
  payload_json: string;
}

export interface PMetricSeries {
  run_id: string;
  key: string;
  steps: number[];
  values: number[];
  total_points: number;
}

export interface PLossDistribution {
  run_id: string;
  epoch: number;
  bin_edges: number[];
  counts: number[];
  p50: number;
  p90: number;
  p99: number;
  mean: number;
  seen: number;
  total: number;
  epochs: number[];
}

export interface PPlanCard {
  plan_id: string;
  action: string;
  reason: string;
  status: string;
  selection: string;
  recipe_json: string;
  budget_steps: number;
  cooldown_steps: number;
  diagnostics_json: string;
  created: number;
  run_id: string;
}

export interface PHealthReport {
  run_id: string;
  verdicts: { check: string; verdict: string; hint: string; numbers_json: string }[];
}

export interface PComparison {
  runs: string[];
  slices: string[];
  losses: number[];
}

export interface PExportReply {
  ok: boolean;
  path: string;
  rows: number;
  message: string;
  sha256: string;
}

/** ControlService unary RPCs: request and response types. */
export interface UnaryRpcs {
  GetStatus: [Record<string, never>, PSessionStatus];
  Pause: [PRunRequest, PActionReply];
  Resume: [PRunRequest, PActionReply];
  Stop: [PRunRequest, PActionReply];
  Test: [PRunRequest, PActionReply];
  Checkpoint: [PRunRequest, PActionReply];
  SetHyperParams: [{ run: string; values: Record<string, number> }, PActionReply];
  ListRuns: [{ session?: string }, { runs: PRunInfo[] }];
  GetMetrics: [{ run: string; key: string; from_step?: number; to_step?: number; max_points?: number }, PMetricSeries];
  GetLossDistribution: [{ run: string; epoch: number; bins?: number; select?: string }, PLossDistribution];
  Fork: [PForkRequest, PActionReply];
  Merge: [{ method: string; runs: string[]; name?: string; options_json?: string }, PActionReply];
  TrainGate: [{ runs: string[]; name?: string; options_json?: string }, PActionReply];
  CompareExperts: [{ runs: string[]; slices: string[] }, PComparison];
  ExportSlice: [{ run: string; select: string; format: string; path: string; force?: boolean }, PExportReply];
  ExportModel: [{ run: string; path: string; force?: boolean }, PExportReply];
  ExportSession: [{ session?: string; path: string; force?: boolean }, PExportReply];
  ImportSession: [{ path: string }, PExportReply];
  ListPlans: [{ status?: string }, { plans: PPlanCard[] }];
  ApprovePlan: [{ plan_id: string }, PActionReply];
  RejectPlan: [{ plan_id: string }, PActionReply];
  EditPlan: [{ plan_id: string; values: Record<string, string> }, PActionReply];
  SetAutomode: [{ enabled: boolean }, PActionReply];
  RunHealthCheck: [{ run: string; check?: string }, PHealthReport];
}

export type UnaryRpcName = keyof UnaryRpcs;

export interface PRunRequest {
  run: string;
  wait?: boolean;
  timeout_s?: number;
}

export interface PForkRequest {
  run: string;
  select: string;
  budget_steps: number;
  lr_mul?: number;
  wd_mul?: number;
  adapters_rank?: number;
  /** >1: race this many variants (lr multipliers spread log-uniformly over a decade around lr_mul); 0/1: no race. */
  variants?: number;
  name?: string;
  checkpoint?: string;
  /** Explicit lr multipliers of the raced variants, instead of the spread. */
  variant_lr_muls?: number[];
  /** Each rung keeps the best 1/eta; 0 = 2. */
  race_eta?: number;
  /** "slice" (the default) or "val". */
  race_metric?: string;
  /** "asha" (the default) or "sync". */
  race_mode?: string;
  /** Early stopping: evaluations without improvement before the fork ends (0 = off). */
  early_stop_patience?: number;
  /** "slice" (the default) or "val". */
  early_stop_metric?: string;
  early_stop_min_delta?: number;
  /** Steps between evaluations (0 = budget/10). */
  early_stop_every?: number;
}
