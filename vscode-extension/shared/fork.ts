/**
 * Racing fork variants (ForkRequest.variants / variant_lr_muls / race_eta / race_metric /
 * race_mode) and early stopping (early_stop_patience / _metric / _min_delta / _every): the
 * limits, the checks both sides apply, and the parsing of the dashboard's fork form. The
 * rules are the CLI's (`onthefly fork --variants N --race-eta E --race-metric M
 * --early-stop-patience P ...`) and the supervisor's: a race has 2..16 variants, eta is
 * 2..8, race options without a race are an error; early stopping has a patience of
 * 0..1000000 (0 = off), its other options need a patience, and it must be able to stop
 * the fork before the end of its budget.
 *
 * Imports neither `vscode` nor the DOM: the webview checks the form with it before it
 * sends anything, the host checks every fork request with it again (shared/protocol.ts).
 */

/** The most variants one race may have (the supervisor's MAX_VARIANTS). */
export const MAX_VARIANTS = 16;
export const MIN_ETA = 2;
export const MAX_ETA = 8;
/** Each rung keeps the best 1/eta; the supervisor's default (0 on the wire) is 2. */
export const DEFAULT_ETA = 2;

/** What a rung compares at equal steps: the loss on the fork's selection, or the validation loss. */
export type RaceMetric = 'slice' | 'val';
export const RACE_METRICS: readonly RaceMetric[] = ['slice', 'val'];

/**
 * asha: a variant goes on as soon as it ranks in the top 1/eta of those that finished its
 * rung so far; sync: every variant of a rung reports before the best 1/eta go on.
 */
export type RaceMode = 'asha' | 'sync';
export const RACE_MODES: readonly RaceMode[] = ['asha', 'sync'];

/** The race part of a fork request, as the webview sends it (protocol.ts ForkParams). */
export interface ForkRace {
  /** 1 = one fork (no race); 2..16 = race that many variants. Omitted = 1. */
  variants?: number;
  /** Explicit lr multipliers of the variants (instead of the spread around lrMul); their count is the variants. */
  variantLrMuls?: number[];
  raceEta?: number;
  raceMetric?: RaceMetric;
  raceMode?: RaceMode;
}

export const RACE_NEEDS_VARIANTS = 'race options need 2 or more variants';

/**
 * Checks the race fields of a fork request; a one-line error, or null when they are fine.
 * Unset fields are fine: the supervisor's defaults apply (eta 2, slice, asha).
 */
export function validateForkRace(r: ForkRace): string | null {
  const muls = r.variantLrMuls;
  if (r.variants !== undefined && !(Number.isInteger(r.variants) && r.variants >= 1 && r.variants <= MAX_VARIANTS)) {
    return `variants must be an integer in 1..${MAX_VARIANTS} (1 = one fork, no race)`;
  }
  if (muls !== undefined) {
    if (!Array.isArray(muls) || muls.length < 2 || muls.length > MAX_VARIANTS) {
      return `lr multipliers: give 2..${MAX_VARIANTS} of them, one per variant (got ${Array.isArray(muls) ? muls.length : 'none'})`;
    }
    const bad = muls.find((m) => typeof m !== 'number' || !Number.isFinite(m) || m <= 0);
    if (bad !== undefined) return `lr multiplier ${String(bad)}: each must be a positive number`;
    if (r.variants !== undefined && r.variants !== muls.length) {
      return `variants ${r.variants} but ${muls.length} lr multipliers were given (their count is the number of variants)`;
    }
  }
  const n = muls?.length ?? r.variants ?? 1;
  if (n < 2 && (r.raceEta !== undefined || r.raceMetric !== undefined || r.raceMode !== undefined)) return RACE_NEEDS_VARIANTS;
  if (r.raceEta !== undefined && !(Number.isInteger(r.raceEta) && r.raceEta >= MIN_ETA && r.raceEta <= MAX_ETA)) {
    return `race eta must be an integer in ${MIN_ETA}..${MAX_ETA} (each rung keeps the best 1/eta)`;
  }
  if (r.raceMetric !== undefined && !RACE_METRICS.includes(r.raceMetric)) {
    return `compare on must be one of ${RACE_METRICS.join(', ')}`;
  }
  if (r.raceMode !== undefined && !RACE_MODES.includes(r.raceMode)) {
    return `race mode must be one of ${RACE_MODES.join(', ')}`;
  }
  return null;
}

/** The fork form's race inputs, as typed (empty string = not given; variants is required). */
export interface ForkRaceForm {
  variants: string;
  eta: string;
  metric: string;
  mode: string;
  /** Comma (or space) separated lr multipliers; empty = spread them around the lr multiplier. */
  lrMuls: string;
}

/**
 * Parses a comma/space separated list of lr multipliers. [] for an empty field; an error
 * for a token that is not a number.
 */
export function parseLrMuls(text: string): number[] | { error: string } {
  const tokens = text
    .split(/[\s,;]+/)
    .map((t) => t.trim())
    .filter(Boolean);
  const out: number[] = [];
  for (const t of tokens) {
    const x = Number(t);
    if (!Number.isFinite(x) || x <= 0) return { error: `lr multiplier "${t}": each must be a positive number` };
    out.push(x);
  }
  return out;
}

function parseInteger(text: string): number {
  const t = text.trim();
  return /^[+-]?\d+$/.test(t) ? Number(t) : NaN;
}

/**
 * The race fields of a fork request from the form, or a one-line error. Variants must be
 * an integer; another field left empty is not sent. Explicit lr multipliers set the
 * number of variants. Any race option with fewer than 2 variants is an error.
 */
export function forkRaceFromForm(f: ForkRaceForm): { race: ForkRace } | { error: string } {
  const race: ForkRace = { variants: parseInteger(f.variants) };
  if (Number.isNaN(race.variants)) return { error: `variants "${f.variants.trim()}": must be an integer in 1..${MAX_VARIANTS} (1 = one fork, no race)` };
  if (f.lrMuls.trim() !== '') {
    const muls = parseLrMuls(f.lrMuls);
    if (!Array.isArray(muls)) return muls;
    if (muls.length < 2 || muls.length > MAX_VARIANTS) {
      return { error: `lr multipliers: give 2..${MAX_VARIANTS} of them, one per variant (got ${muls.length})` };
    }
    race.variantLrMuls = muls;
    // Their count is the number of variants.
    race.variants = muls.length;
  }
  if (f.eta.trim() !== '') {
    race.raceEta = parseInteger(f.eta);
    if (Number.isNaN(race.raceEta)) return { error: `race eta "${f.eta.trim()}": must be an integer in ${MIN_ETA}..${MAX_ETA}` };
  }
  if (f.metric.trim() !== '') race.raceMetric = f.metric.trim() as RaceMetric;
  if (f.mode.trim() !== '') race.raceMode = f.mode.trim() as RaceMode;
  const bad = validateForkRace(race);
  if (bad) return { error: bad };
  return { race };
}

// ---------------------------------------------------------------------------
// Early stopping
// ---------------------------------------------------------------------------

/** The supervisor's budget when a request gives none (budget_steps 0). */
export const DEFAULT_BUDGET_STEPS = 300;
/** The largest patience the supervisor takes (0 = off). */
export const MAX_EARLY_STOP_PATIENCE = 1_000_000;

/** What early stopping watches: the loss on the fork's selection (the default), or the validation loss. */
export type EarlyStopMetric = 'slice' | 'val';
export const EARLY_STOP_METRICS: readonly EarlyStopMetric[] = ['slice', 'val'];

/** The early-stopping part of a fork request, as the webview sends it (protocol.ts ForkParams). */
export interface ForkEarlyStop {
  /** End the fork after this many evaluations in a row without improvement; 0/unset = off. */
  earlyStopPatience?: number;
  /** "slice" (the default) or "val"; '' = the default. */
  earlyStopMetric?: EarlyStopMetric;
  /** An improvement must exceed this (default 0: any decrease). */
  earlyStopMinDelta?: number;
  /** Evaluate every this many steps (0/unset = max(1, budget / 10)). */
  earlyStopEvery?: number;
}

export const EARLY_STOP_NEEDS_PATIENCE = 'early-stop metric/min delta/every need a patience N (N >= 1)';

/** The steps between early-stop evaluations the supervisor uses: `every`, or max(1, budget / 10) when 0. */
export function earlyStopCadence(budgetSteps: number, every = 0): number {
  return every > 0 ? every : Math.max(1, Math.floor(budgetSteps / 10));
}

/** The budget the supervisor gives a fork for `budgetSteps` as the relay sends it (0 = its default, 300). */
export function effectiveBudget(budgetSteps: number): number {
  return Math.max(0, Math.floor(budgetSteps)) || DEFAULT_BUDGET_STEPS;
}

/**
 * Checks the early-stopping fields of a fork request with the supervisor's rules, in its
 * order (onthefly_supervisor/method.py _early_stop_options); a one-line error, or null when
 * they are fine. Unset, 0 and '' fields are fine: off, or the supervisor's defaults
 * (slice, min delta 0, every budget / 10). With a budget, a patience that cannot stop the
 * fork before its end (patience × every >= budget) is refused, as the supervisor does.
 * Not checked here (the supervisor does): that the parent reports a validation loss for
 * metric val.
 */
export function validateForkEarlyStop(f: ForkEarlyStop, budgetSteps?: number): string | null {
  const patience = f.earlyStopPatience ?? 0;
  if (typeof patience !== 'number' || !Number.isInteger(patience) || patience < 0 || patience > MAX_EARLY_STOP_PATIENCE) {
    return `early-stop patience ${String(patience)}: must be an integer in 0..${MAX_EARLY_STOP_PATIENCE} (0 = off)`;
  }
  const metric = f.earlyStopMetric ?? '';
  const minDelta = f.earlyStopMinDelta ?? 0;
  const every = f.earlyStopEvery ?? 0;
  if (patience === 0) {
    // The supervisor's test is truthiness: '' / 0 are "not given".
    if (metric || minDelta || every) return EARLY_STOP_NEEDS_PATIENCE;
    return null;
  }
  if (metric && !EARLY_STOP_METRICS.includes(metric)) return `early-stop metric "${String(metric)}": one of ${EARLY_STOP_METRICS.join(', ')}`;
  if (typeof minDelta !== 'number' || !Number.isFinite(minDelta) || minDelta < 0) {
    return `early-stop min delta ${String(minDelta)}: must be a finite number >= 0`;
  }
  if (typeof every !== 'number' || !Number.isInteger(every) || every < 0) {
    return `early-stop every ${String(every)}: must be an integer number of steps >= 1 (0 = budget / 10)`;
  }
  if (budgetSteps !== undefined && Number.isFinite(budgetSteps)) {
    const budget = effectiveBudget(budgetSteps);
    const cadence = earlyStopCadence(budget, every);
    if (patience * cadence >= budget) {
      return `early-stop patience ${patience} with an evaluation every ${cadence} steps cannot stop a ${budget}-step fork before its end; lower the patience or the early-stop every`;
    }
  }
  return null;
}

/** The fork form's early-stop inputs, as typed (empty string = not given; empty or 0 patience = off). */
export interface ForkEarlyStopForm {
  patience: string;
  metric: string;
  minDelta: string;
  every: string;
}

/**
 * The early-stopping fields of a fork request from the form, or a one-line error. An
 * empty or 0 patience turns early stopping off (nothing is sent); another field left
 * empty is not sent (the supervisor's default). Any other field without a patience is an
 * error (the form hides and does not pass them then).
 */
export function forkEarlyStopFromForm(f: ForkEarlyStopForm, budgetSteps: number): { earlyStop: ForkEarlyStop } | { error: string } {
  const es: ForkEarlyStop = {};
  const p = f.patience.trim();
  if (p !== '') {
    es.earlyStopPatience = parseInteger(p);
    if (Number.isNaN(es.earlyStopPatience)) return { error: `early-stop patience "${p}": must be an integer in 0..${MAX_EARLY_STOP_PATIENCE} (0 = off)` };
    if (es.earlyStopPatience === 0) delete es.earlyStopPatience;
  }
  if (f.metric.trim() !== '') es.earlyStopMetric = f.metric.trim() as EarlyStopMetric;
  const d = f.minDelta.trim();
  if (d !== '') {
    es.earlyStopMinDelta = Number(d);
    if (Number.isNaN(es.earlyStopMinDelta)) return { error: `early-stop min delta "${d}": must be a finite number >= 0` };
  }
  const e = f.every.trim();
  if (e !== '') {
    es.earlyStopEvery = parseInteger(e);
    if (Number.isNaN(es.earlyStopEvery)) return { error: `early-stop every "${e}": must be an integer number of steps >= 1 (empty = budget / 10)` };
  }
  const bad = validateForkEarlyStop(es, budgetSteps);
  if (bad) return { error: bad };
  // Off: nothing to send (a 0 min delta or every left over means "default").
  return { earlyStop: es.earlyStopPatience ? es : {} };
}
