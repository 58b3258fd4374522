/**
 * The views the real supervisor cannot drive on demand (plan cards, health verdicts,
 * compare table, gate / merge / automode, exports, the fork form's race of variants and
 * early-stop fields, a reconnect in the middle), in the browser, against the fake ControlService
 * (test/fakeSupervisor.ts). Every click must reach the RPC the CLI calls, with the right
 * fields, and every answer must show.
 * The real-supervisor tests are dashboard.e2e.test.ts and failure.e2e.test.ts.
 */
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import type { PPlanCard } from '../../src/protoTypes';
import { FakeSupervisor, fakeEvent, grpcError } from '../fakeSupervisor';
import { DashboardPage, browserPath, waitFor } from './harness';

function plan(id: string, over: Partial<PPlanCard> = {}): PPlanCard {
  return {
    plan_id: id,
    action: 'fork',
    reason: 'loss plateau on the hardest 10% (Mann-Kendall p=0.01)',
    status: 'proposed',
    selection: 'quantile:0.9:1.0',
    recipe_json: '{"lr_mul": 0.5}',
    budget_steps: 300,
    cooldown_steps: 100,
    diagnostics_json: '{"slope": -0.0001}',
    created: 1000,
    run_id: 'main',
    ...over,
  };
}

describe('dashboard views in a browser (fake supervisor)', { timeout: 120_000 }, () => {
  let dir: string;
  let file: string;
  let sup: FakeSupervisor;
  let d: DashboardPage;

  const handlers = (): Record<string, (r: Record<string, unknown>) => unknown> => ({
    GetMetrics: (r) => {
      const n = 200;
      const steps = Array.from({ length: n }, (_, i) => i + 1);
      return { run_id: r.run, key: r.key, steps, values: steps.map((s) => 1 / s), total_points: n };
    },
    GetLossDistribution: (r) => ({
      run_id: r.run, epoch: 1, bin_edges: [0, 0.25, 0.5, 0.75, 1], counts: [40, 30, 20, 10], p50: 0.3, p90: 0.75, p99: 0.98, mean: 0.35, seen: 100, total: 100, epochs: [0, 1],
    }),
    ApprovePlan: (r) => {
      sup.plans = sup.plans.map((p) => (p.plan_id === r.plan_id ? { ...p, status: 'approved' } : p));
      sup.publish('plan', { plan_id: r.plan_id, status: 'approved' });
      return { ok: true, message: `approved ${r.plan_id}` };
    },
    RejectPlan: (r) => {
      sup.plans = sup.plans.map((p) => (p.plan_id === r.plan_id ? { ...p, status: 'rejected' } : p));
      sup.publish('plan', { plan_id: r.plan_id, status: 'rejected' });
      return { ok: true, message: `rejected ${r.plan_id}` };
    },
    EditPlan: (r) => {
      const values = r.values as Record<string, string>;
      sup.plans = sup.plans.map((p) => (p.plan_id === r.plan_id ? { ...p, budget_steps: Number(values.budget_steps ?? p.budget_steps) } : p));
      sup.publish('plan', { plan_id: r.plan_id, status: 'proposed' });
      return { ok: true, message: 'edited' };
    },
    RunHealthCheck: (r) => ({
      run_id: r.run,
      verdicts: [
        { check: 'numerics', verdict: 'ok', hint: 'no NaN/Inf in 200 steps', numbers_json: '{"nonfinite": 0}' },
        { check: 'gradients', verdict: 'warn', hint: 'grad norm spikes 12x the median', numbers_json: '{"ratio": 12.0}' },
      ],
    }),
    CompareExperts: (r) => ({ runs: r.runs, slices: r.slices, losses: (r.runs as string[]).flatMap((_, i) => (r.slices as string[]).map((_s, j) => 0.5 - 0.1 * i + 0.01 * j)) }),
    Fork: (r) => (Number(r.variants) > 1 ? { ok: true, message: `race of ${r.variants} variants started`, run_id: 'race-1' } : { ok: true, message: 'fork started', run_id: 'fork-3' }),
    TrainGate: () => ({ ok: true, message: 'gate training started', run_id: 'moe-1' }),
    Merge: () => {
      throw grpcError(grpc.status.FAILED_PRECONDITION, 'fisher_soup needs at least two runs with the same architecture');
    },
    Stop: () => {
      throw grpcError(grpc.status.FAILED_PRECONDITION, 'run main already finished');
    },
    Test: () => ({ ok: true, message: 'test queued', run_id: 'main' }),
    ExportSlice: (r) => ({ ok: true, path: r.path, rows: 310, sha256: 'c0ffee'.padEnd(64, '0') }),
    ExportSession: (r) => ({ ok: true, path: r.path, rows: 0, sha256: 'beef'.padEnd(64, '0') }),
    ImportSession: () => {
      throw grpcError(grpc.status.INVALID_ARGUMENT, 'not an OnTheFly session archive (checksum manifest missing)');
    },
  });

  const newFake = (events = [fakeEvent(1, 'log', { worker_id: 'main-0', level: 'info', text: 'hello from the worker' })]) =>
    new FakeSupervisor({
      sessionId: 'fake-session',
      events,
      runs: [
        { run_id: 'main', name: 'baseline', kind: 'main', created: 1, step: 200 },
        { run_id: 'fork-1', name: 'hard-tail', kind: 'fork', parents: ['main'], created: 2, status: 'RUN_STATUS_COMPLETED' },
        { run_id: 'fork-2', name: 'kmeans-2', kind: 'fork', parents: ['main'], created: 3, status: 'RUN_STATUS_FAILED', error: 'RuntimeError: CUDA out of memory' },
      ],
      plans: [plan('p1'), plan('p2', { action: 'merge', selection: '', created: 2000 })],
      handlers: handlers(),
    }).start();

  before(async () => {
    assert.ok(fs.existsSync(browserPath), `no browser at ${browserPath}: run \`make system-deps\``);
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'otf-views-'));
    file = path.join(dir, '.onthefly', 'sessions', 'latest', 'connection.json');
    sup = await newFake();
    sup.writeConnection(file);
    d = new DashboardPage(file, dir);
    await d.open();
    await d.goto();
    await waitFor('connected', async () => (await d.page.textContent('#conn-state')) === 'connected', 15_000);
  });

  after(async () => {
    await d?.close();
    sup?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('lists runs and lineage; clicking a node selects the run everywhere', async () => {
    await waitFor('three runs', async () => (await d.page.$$('#runs-body tr[data-run]')).length === 3);
    assert.equal((await d.page.$$('#lineage-svg g[data-run]')).length, 3);
    assert.equal((await d.page.$$('#lineage-svg path.lineage-edge')).length, 2);
    await d.page.click('#lineage-svg g[data-run="fork-1"]');
    await waitFor('fork-1 selected', async () => (await d.page.getAttribute('#selected-run', 'data-run')) === 'fork-1');
    await waitFor('charts and histogram asked for fork-1', () => sup.calls.some((c) => c.method === 'GetMetrics' && c.request.run === 'fork-1') && sup.calls.some((c) => c.method === 'GetLossDistribution' && c.request.run === 'fork-1'));
    assert.match((await d.page.textContent('#run-relatives')) ?? '', /fork-1: parents main · children —/);
    assert.match((await d.page.getAttribute('#runs-body tr[data-run="fork-2"]', 'title')) ?? '', /CUDA out of memory/);
    await d.page.click('#runs-body tr[data-run="main"] td:nth-child(2)');
    await waitFor('main selected', async () => (await d.page.getAttribute('#selected-run', 'data-run')) === 'main');
  });

  it('plan cards: approve, edit, reject call the planner RPCs and follow plan events', async () => {
    await waitFor('two plan cards', async () => (await d.page.$$('#plans .plan')).length === 2);
    await d.clickAndSettle('#plan-approve-p1');
    assert.deepEqual({ ...sup.lastCall('ApprovePlan') }, { plan_id: 'p1' });
    await waitFor('p1 approved', async () => (await d.page.getAttribute('#plans .plan[data-plan="p1"]', 'class'))?.includes('plan-approved'));

    await d.page.click('#plan-edit-p2');
    const editor = d.page.locator('#plans .plan[data-plan="p2"] textarea');
    const text = await editor.inputValue();
    assert.match(text, /^budget_steps=300$/m);
    await editor.fill(text.replace('budget_steps=300', 'budget_steps=500'));
    await d.clickAndSettle('#plan-save-p2');
    const edit = sup.lastCall('EditPlan') as { plan_id: string; values: Record<string, string> };
    assert.equal(edit.plan_id, 'p2');
    assert.equal(edit.values.budget_steps, '500');
    assert.equal(edit.values.lr_mul, '0.5');
    await waitFor('p2 shows the new budget', async () => (await d.page.textContent('#plans .plan[data-plan="p2"]'))?.includes('budget 500 steps'));

    await d.clickAndSettle('#plan-reject-p2');
    assert.deepEqual({ ...sup.lastCall('RejectPlan') }, { plan_id: 'p2' });
    await waitFor('p2 rejected', async () => (await d.page.getAttribute('#plans .plan[data-plan="p2"]', 'class'))?.includes('plan-rejected'));
  });

  it('automode, test and stop call their RPCs; a refusal is a message', async () => {
    await d.page.check('#automode');
    await waitFor('SetAutomode(true)', () => sup.lastCall('SetAutomode')?.enabled === true);
    await d.clickAndSettle('#btn-test');
    assert.equal(sup.lastCall('Test')?.run, 'main');
    await d.clickAndSettle('#btn-stop');
    assert.ok((await d.toasts()).some((t) => t === 'Stop failed: FAILED_PRECONDITION: run main already finished'));
    assert.equal(await d.page.isEnabled('#btn-stop'), true);
  });

  it('health verdicts and the compare-experts table', async () => {
    await d.page.selectOption('#health-check', 'numerics');
    await d.clickAndSettle('#btn-health');
    assert.deepEqual({ ...sup.lastCall('RunHealthCheck') }, { run: 'main', check: 'numerics' });
    assert.equal(await d.page.textContent('#health-result tr[data-check="gradients"] .badge'), 'warn');

    await d.page.check('#runs-body input[data-run="fork-1"]');
    await d.page.check('#runs-body input[data-run="main"]');
    await d.page.fill('#compare-slices', 'val, fork-1, fork-2');
    await d.clickAndSettle('#btn-compare');
    const cmp = sup.lastCall('CompareExperts') as { runs: string[]; slices: string[] };
    assert.deepEqual(cmp.runs, ['main', 'fork-1'], 'the selected run first');
    assert.deepEqual(cmp.slices, ['val', 'fork-1', 'fork-2']);
    assert.equal((await d.page.$$('#compare-table tbody tr')).length, 2);
    assert.equal(await d.page.textContent('#compare-table tbody tr:nth-child(2) td.best'), '0.4');
  });

  it('gate and merge over the ticked runs; the merge method picker', async () => {
    await d.clickAndSettle('#btn-gate');
    assert.deepEqual((sup.lastCall('TrainGate') as { runs: string[] }).runs, ['main', 'fork-1']);
    await d.page.selectOption('#merge-method', 'fisher_soup');
    await d.clickAndSettle('#btn-merge');
    const m = sup.lastCall('Merge') as { method: string; runs: string[] };
    assert.equal(m.method, 'fisher_soup');
    assert.deepEqual(m.runs, ['main', 'fork-1']);
    assert.ok((await d.toasts()).some((t) => t.startsWith('Merge failed: FAILED_PRECONDITION: fisher_soup needs')));
  });

  it('the histogram brush fills the fork form from the cumulative counts', async () => {
    await waitFor('the distribution', () => d.page.evaluate(() => !!(window as unknown as { __ontheflyDebug: { distribution(): unknown } }).__ontheflyDebug.distribution()));
    // Counts 40/30/20/10 over [0,1): brushing [0.5, 1] is the top 30% -> quantile:0.7:1.0.
    const box = await d.page.locator('#hist-canvas').boundingBox();
    assert.ok(box);
    const padL = 8;
    const padR = 8;
    const x = (loss: number) => box.x + padL + loss * (box.width - padL - padR);
    await d.page.mouse.move(x(0.5), box.y + 80);
    await d.page.mouse.down();
    await d.page.mouse.move(x(1) + 20, box.y + 80, { steps: 5 });
    await d.page.mouse.up();
    assert.equal(await d.page.inputValue('#fork-select'), 'quantile:0.7:1.0');
    assert.match((await d.page.textContent('#fork-hint')) ?? '', /≈30 samples/);
  });

  it('the fork form races variants: the race fields reach ForkRequest; a bad value shows inline and sends nothing', async () => {
    type ForkCall = { select: string; budget_steps: number; lr_mul: number; variants: number; variant_lr_muls: number[]; race_eta: number; race_metric: string; race_mode: string };
    const forkCalls = () => sup.calls.filter((c) => c.method === 'Fork').length;
    // One variant: no race fields.
    assert.equal(await d.page.inputValue('#fork-variants'), '1');
    assert.equal(await d.page.isHidden('#fork-race'), true, 'race fields hidden with 1 variant');

    await d.page.fill('#fork-budget', '240');
    await d.page.fill('#fork-lr', '0.5');
    await d.page.fill('#fork-variants', '4');
    assert.equal(await d.page.isVisible('#fork-race'), true, 'race fields shown with 4 variants');
    assert.equal(await d.page.inputValue('#fork-race-eta'), '2', 'eta defaults to 2');
    assert.equal(await d.page.inputValue('#fork-race-metric'), 'slice');
    assert.equal(await d.page.inputValue('#fork-race-mode'), 'asha');
    await d.page.fill('#fork-race-eta', '3');
    await d.page.selectOption('#fork-race-metric', 'val');
    await d.page.selectOption('#fork-race-mode', 'sync');
    await d.clickAndSettle('#btn-fork');
    const race = sup.lastCall('Fork') as ForkCall;
    assert.deepEqual(
      { select: race.select, budget_steps: race.budget_steps, lr_mul: race.lr_mul, variants: race.variants, variant_lr_muls: race.variant_lr_muls, race_eta: race.race_eta, race_metric: race.race_metric, race_mode: race.race_mode },
      { select: 'quantile:0.7:1.0', budget_steps: 240, lr_mul: 0.5, variants: 4, variant_lr_muls: [], race_eta: 3, race_metric: 'val', race_mode: 'sync' },
    );
    await waitFor('the race toast', async () => (await d.toasts()).some((t) => t === 'Race of 4 variants of main on quantile:0.7:1.0: race of 4 variants started (race-1)'));
    assert.equal(await d.page.textContent('#fork-error'), '');

    // A bad value: the reason next to the form, no request to the host, no RPC.
    const sent = d.countRequests('fork');
    const before = forkCalls();
    const rejects: [string, string, RegExp][] = [
      ['#fork-race-eta', '9', /^Fork: race eta must be an integer in 2\.\.8/],
      ['#fork-race-eta', '1', /^Fork: race eta must be an integer in 2\.\.8/],
      ['#fork-variants', '17', /^Fork: variants must be an integer in 1\.\.16/],
    ];
    for (const [sel, value, re] of rejects) {
      const keep = await d.page.inputValue(sel);
      await d.page.fill(sel, value);
      await d.clickAndSettle('#btn-fork');
      assert.match((await d.page.textContent('#fork-error')) ?? '', re, `${sel}=${value}`);
      assert.equal(await d.page.isEnabled('#btn-fork'), true);
      await d.page.fill(sel, keep);
      assert.equal(await d.page.textContent('#fork-error'), '', 'editing clears the error');
    }
    await d.page.fill('#fork-lr-muls', '0.5, -1, 2');
    await d.clickAndSettle('#btn-fork');
    assert.match((await d.page.textContent('#fork-error')) ?? '', /^Fork: lr multiplier "-1": each must be a positive number/);
    await d.page.fill('#fork-lr-muls', '0.5');
    await d.clickAndSettle('#btn-fork');
    assert.match((await d.page.textContent('#fork-error')) ?? '', /^Fork: lr multipliers: give 2\.\.16 of them, one per variant \(got 1\)/);
    assert.equal(d.countRequests('fork'), sent, 'nothing sent to the host');
    assert.equal(forkCalls(), before, 'no Fork RPC');

    // Explicit lr multipliers: their count sets the variants.
    await d.page.fill('#fork-lr-muls', '0.25, 1, 4');
    assert.equal(await d.page.inputValue('#fork-variants'), '3');
    assert.equal(await d.page.getAttribute('#fork-variants', 'readonly'), '', 'the count is set by the multipliers');
    await d.clickAndSettle('#btn-fork');
    const explicit = sup.lastCall('Fork') as ForkCall;
    assert.deepEqual(
      [explicit.variants, explicit.variant_lr_muls, explicit.race_eta, explicit.race_metric, explicit.race_mode],
      [3, [0.25, 1, 4], 3, 'val', 'sync'],
    );
    assert.equal(await d.page.textContent('#fork-error'), '');
    await d.shot('21-fork-race');

    // Back to one fork: the hidden race fields are not sent.
    await d.page.fill('#fork-lr-muls', '');
    assert.equal(await d.page.getAttribute('#fork-variants', 'readonly'), null);
    await d.page.fill('#fork-variants', '1');
    assert.equal(await d.page.isHidden('#fork-race'), true);
    await d.clickAndSettle('#btn-fork');
    const single = sup.lastCall('Fork') as ForkCall;
    assert.deepEqual(
      [single.variants, single.variant_lr_muls, single.race_eta, single.race_metric, single.race_mode],
      [1, [], 0, '', ''],
    );
    assert.equal(forkCalls(), before + 2);
  });

  it('the fork form stops early: its fields reach ForkRequest, show only with a patience, and a value the supervisor would refuse shows inline', async () => {
    type ForkCall = { budget_steps: number; variants: number; early_stop_patience: number; early_stop_metric: string; early_stop_min_delta: number; early_stop_every: number };
    const early = (c: ForkCall) => [c.early_stop_patience, c.early_stop_metric, c.early_stop_min_delta, c.early_stop_every];
    const forkCalls = () => sup.calls.filter((c) => c.method === 'Fork').length;
    // Off by default: patience 0, the other fields hidden, none sent (the race test's forks had all zeros).
    assert.equal(await d.page.inputValue('#fork-early-stop-patience'), '0');
    assert.equal(await d.page.isHidden('#fork-early-stop'), true, 'early-stop fields hidden with patience 0');
    assert.deepEqual(early(sup.lastCall('Fork') as ForkCall), [0, '', 0, 0]);

    await d.page.fill('#fork-budget', '200');
    await d.page.fill('#fork-early-stop-patience', '3');
    assert.equal(await d.page.isVisible('#fork-early-stop'), true, 'early-stop fields shown with patience 3');
    assert.equal(await d.page.inputValue('#fork-early-stop-metric'), 'slice');
    assert.equal(await d.page.inputValue('#fork-early-stop-min-delta'), '0');
    assert.equal(await d.page.inputValue('#fork-early-stop-every'), '');
    assert.equal(await d.page.getAttribute('#fork-early-stop-every', 'placeholder'), '20 (budget / 10)', 'the default cadence for this budget');
    // A patience alone: the rest at the supervisor's defaults.
    await d.clickAndSettle('#btn-fork');
    assert.deepEqual(early(sup.lastCall('Fork') as ForkCall), [3, 'slice', 0, 0]);

    await d.page.selectOption('#fork-early-stop-metric', 'val');
    await d.page.fill('#fork-early-stop-min-delta', '0.005');
    await d.page.fill('#fork-early-stop-every', '25');
    await d.clickAndSettle('#btn-fork');
    const sent = sup.lastCall('Fork') as ForkCall;
    assert.deepEqual([sent.budget_steps, ...early(sent)], [200, 3, 'val', 0.005, 25]);
    assert.equal(await d.page.textContent('#fork-error'), '');

    // The supervisor's rules, inline: no request to the host, no RPC.
    const requests = d.countRequests('fork');
    const before = forkCalls();
    const rejects: [string, string, RegExp][] = [
      ['#fork-early-stop-every', '80', /^Fork: early-stop patience 3 with an evaluation every 80 steps cannot stop a 200-step fork before its end; lower the patience or the early-stop every$/],
      ['#fork-early-stop-patience', '10', /^Fork: early-stop patience 10 with an evaluation every 25 steps cannot stop a 200-step fork/],
      ['#fork-early-stop-patience', '1.5', /^Fork: early-stop patience "1\.5": must be an integer in 0\.\.1000000 \(0 = off\)$/],
      ['#fork-early-stop-min-delta', '-0.1', /^Fork: early-stop min delta -0\.1: must be a finite number >= 0$/],
      ['#fork-early-stop-every', '2.5', /^Fork: early-stop every "2\.5": must be an integer number of steps >= 1/],
    ];
    for (const [sel, value, re] of rejects) {
      const keep = await d.page.inputValue(sel);
      await d.page.fill(sel, value);
      await d.clickAndSettle('#btn-fork');
      assert.match((await d.page.textContent('#fork-error')) ?? '', re, `${sel}=${value}`);
      await d.page.fill(sel, keep);
      assert.equal(await d.page.textContent('#fork-error'), '', 'editing clears the error');
    }
    assert.equal(d.countRequests('fork'), requests, 'nothing sent to the host');
    assert.equal(forkCalls(), before, 'no Fork RPC');
    await d.shot('22-fork-early-stop');

    // Early stopping rides along with a race.
    await d.page.fill('#fork-variants', '4');
    await d.clickAndSettle('#btn-fork');
    const race = sup.lastCall('Fork') as ForkCall;
    assert.deepEqual([race.variants, ...early(race)], [4, 3, 'val', 0.005, 25]);
    await d.page.fill('#fork-variants', '1');

    // Patience 0 again: the fields hide and are not sent.
    await d.page.fill('#fork-early-stop-patience', '0');
    assert.equal(await d.page.isHidden('#fork-early-stop'), true);
    await d.clickAndSettle('#btn-fork');
    assert.deepEqual(early(sup.lastCall('Fork') as ForkCall), [0, '', 0, 0]);
    assert.equal(forkCalls(), before + 2);
  });

  it('export slice / session through the save dialog; import errors show', async () => {
    await d.page.selectOption('#export-format', 'parquet');
    await d.clickAndSettle('#btn-export-slice');
    const ex = sup.lastCall('ExportSlice') as { run: string; select: string; format: string; path: string; force: boolean };
    assert.equal(ex.format, 'parquet');
    assert.equal(ex.select, 'quantile:0.7:1.0');
    assert.equal(ex.path, path.join(dir, 'main-quantile_0.7_1.0.parquet'));
    assert.match((await d.page.textContent('#export-result')) ?? '', /310 rows/);

    await d.clickAndSettle('#btn-export-session');
    assert.equal((sup.lastCall('ExportSession') as { path: string }).path, path.join(dir, 'onthefly-fake-session.tar.gz'));

    d.openPaths.push(path.join(dir, 'some.tar.gz'));
    await d.clickAndSettle('#btn-import-session');
    assert.equal((sup.lastCall('ImportSession') as { path: string }).path, path.join(dir, 'some.tar.gz'));
    assert.ok((await d.toasts()).some((t) => t.includes('Import session failed: INVALID_ARGUMENT: not an OnTheFly session archive')));
    await d.shot('20-views');
  });

  it('logs and root cause from events; a reconnect replays only what was missed', async () => {
    sup.publish('error', { worker_id: 'fork-2-0', message: 'RuntimeError: CUDA out of memory', traceback: 'Traceback...\nRuntimeError: CUDA out of memory', filename: 'train.py', lineno: 88 }, 'fork-2');
    sup.publish('error', { worker_id: 'fork-2-0', message: 'SystemExit: 1', traceback: '', filename: '', lineno: 0 }, 'fork-2');
    await waitFor('root cause', () => d.page.$('#errors .error-box.root-cause'));
    assert.equal(await d.page.textContent('#errors .root-cause .error-message'), 'RuntimeError: CUDA out of memory', 'the earliest failure is the root cause');
    assert.equal(await d.page.textContent('#errors .root-cause .error-loc'), 'train.py:88');
    assert.equal((await d.page.$$('#errors .error-box')).length, 2);
    assert.ok((await d.page.textContent('#logs'))?.includes('hello from the worker'));

    // The supervisor goes away and comes back (another port): the view reconnects and
    // gets exactly the events it missed.
    const lastSeq = sup.events.at(-1)!.seq;
    sup.stop();
    await waitFor('reconnecting banner', async () => (await d.page.textContent('#conn-state')) === 'reconnecting', 15_000);
    const events = [...sup.events, fakeEvent(lastSeq + 1, 'log', { worker_id: 'main-0', level: 'warning', text: 'missed while away' })];
    const plans = sup.plans;
    sup = await newFake(events);
    sup.plans = plans;
    sup.writeConnection(file);
    await waitFor('connected again', async () => (await d.page.textContent('#conn-state')) === 'connected', 15_000);
    assert.deepEqual(sup.watchFromSeqs, [lastSeq]);
    await waitFor('the missed log line', async () => (await d.page.textContent('#logs'))?.includes('missed while away'));
    const logText = (await d.page.textContent('#logs')) ?? '';
    assert.equal(logText.split('hello from the worker').length - 1, 1, 'nothing shown twice');
    assert.equal((await d.page.$$('#errors .error-box')).length, 2);
    assert.deepEqual(d.pageErrors, []);
    assert.deepEqual(d.cspViolations, []);
  });
});
