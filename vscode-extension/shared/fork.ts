/**
 * Racing fork variants (ForkRequest.variants / variant_lr_muls / race_eta / race_metric /
 * race_mode): the limits, the checks both sides apply, and the parsing of the dashboard's
 * fork form. The rules are the CLI's (`onthefly fork --variants N --race-eta E
 * --race-metric M`) and the supervisor's: a race has 2..16 variants, eta is 2..8, race
 * options without a race are an error.
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
