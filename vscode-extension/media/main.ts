/**
 * The OnTheFly dashboard webview. A view only: it asks the host for data (shared/
 * protocol.ts requests, each one ControlService RPC) and renders what the host pushes
 * (connection state, session events). It imports only the DOM, uPlot and shared/.
 */
import './style.css';
import {
  errorLocation,
  errorPayload,
  evalMetricPoint,
  eventRunId,
  logPayload,
  metricPoints,
  samplesPayload,
  sessionPayload,
  affectsDistribution,
  affectsRuns,
  type ErrorPayload,
} from '../shared/events';
import {
  DEFAULT_ETA,
  EARLY_STOP_METRICS,
  MAX_EARLY_STOP_PATIENCE,
  MAX_ETA,
  MAX_VARIANTS,
  MIN_ETA,
  RACE_METRICS,
  RACE_MODES,
  earlyStopCadence,
  effectiveBudget,
  forkEarlyStopFromForm,
  forkRaceFromForm,
  parseLrMuls,
} from '../shared/fork';
import { validateSelectSpec, type QuantileSelection } from '../shared/histogram';
import { relatives } from '../shared/lineage';
import {
  type ActionDto,
  type ConnectionDto,
  type EventDto,
  EXPORT_FORMATS,
  type ExportDto,
  type ExportFormat,
  type ForkParams,
  HEALTH_CHECKS,
  type HostToWebview,
  MERGE_METHODS,
  type MergeMethod,
  MessageType,
  type PlanDto,
  type RunDto,
  type StatusDto,
  decodeHostMessage,
} from '../shared/protocol';
import { ChartGrid, type Perf } from './charts';
import { clear, fmt, fmtInt, h, throttle } from './dom';
import { GpuView } from './gpuView';
import { HeatmapView } from './heatmapView';
import { HistogramView } from './histogramView';
import { renderLineage } from './lineageView';
import { HostRpc, RpcFailure, vscodeApi } from './rpc';

interface SavedState {
  selectedRun: string;
  checked: string[];
  fork: {
    select: string;
    budget: string;
    lrMul: string;
    rank: string;
    name: string;
    // race fields (absent in the state of older versions)
    variants?: string;
    eta?: string;
    metric?: string;
    mode?: string;
    lrMuls?: string;
    // early-stop fields (absent in the state of older versions)
    esPatience?: string;
    esMetric?: string;
    esMinDelta?: string;
    esEvery?: string;
  };
  exportFormat: ExportFormat;
  mergeMethod: MergeMethod;
  healthCheck: string;
  slices: string;
}

const api = vscodeApi();
const rpc = new HostRpc(api);
const perf: Perf = { firstPaintMs: null, frames: [], zooms: [], framePoints: [] };

type Level = 'info' | 'warning' | 'error';

function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

class Dashboard {
  private connection: ConnectionDto | null = null;
  private status: StatusDto | null = null;
  private runs: RunDto[] = [];
  private selected = '';
  private checked = new Set<string>();
  private errors: (ErrorPayload & { seq: number; runId: string; time: number })[] = [];
  private seenSeq = 0;
  private logCount = 0;

  // elements
  private readonly connPill = h('span', { className: 'pill', id: 'conn-state' }, 'starting');
  private readonly sessionInfo = h('span', { className: 'muted', id: 'session-info' });
  private readonly banner = h('div', { className: 'banner hidden', id: 'banner' });
  private readonly toasts = h('div', { className: 'toasts', id: 'toasts' });
  private readonly runsBody = h('tbody', { id: 'runs-body' });
  private readonly lineageEl = h('div', { className: 'lineage', id: 'lineage' });
  private readonly relEl = h('div', { className: 'muted', id: 'run-relatives' });
  private readonly selectedLabel = h('span', { className: 'selected-run', id: 'selected-run' }, '—');
  private readonly automode = h('input', { type: 'checkbox', id: 'automode' });
  private readonly plansEl = h('div', { className: 'plans', id: 'plans' });
  private readonly healthEl = h('div', { id: 'health-result' });
  private readonly compareEl = h('div', { id: 'compare-result' });
  private readonly logsEl = h('div', { className: 'logs', id: 'logs' });
  private readonly errorsEl = h('div', { className: 'errors', id: 'errors' });
  private readonly exportResult = h('div', { className: 'muted', id: 'export-result' });
  private readonly forkSelect = h('input', { type: 'text', id: 'fork-select', value: 'quantile:0.9:1.0', spellcheck: 'false' });
  private readonly forkBudget = h('input', { type: 'number', id: 'fork-budget', value: '200', min: '1', step: '1' });
  private readonly forkLr = h('input', { type: 'number', id: 'fork-lr', value: '1.0', min: '0', step: '0.1' });
  private readonly forkRank = h('input', { type: 'number', id: 'fork-rank', value: '0', min: '0', step: '1' });
  private readonly forkName = h('input', { type: 'text', id: 'fork-name', placeholder: 'optional' });
  // Racing variants (ForkRequest.variants / race_eta / race_metric / race_mode / variant_lr_muls):
  // the race fields show only with 2 or more variants; explicit lr multipliers set the count.
  private readonly forkVariants = h('input', { type: 'number', id: 'fork-variants', value: '1', min: '1', max: String(MAX_VARIANTS), step: '1', title: `1 = one fork; 2..${MAX_VARIANTS} = race that many variants by successive halving, the winner completes` });
  private readonly forkRaceEta = h('input', { type: 'number', id: 'fork-race-eta', value: String(DEFAULT_ETA), min: String(MIN_ETA), max: String(MAX_ETA), step: '1', title: 'each rung keeps the best 1/eta of the variants' });
  private readonly forkRaceMetric = h('select', { id: 'fork-race-metric', title: 'what a rung compares at equal steps: the loss on the selection, or the validation loss' });
  private readonly forkRaceMode = h('select', { id: 'fork-race-mode', title: 'asha: a variant goes on as soon as it ranks in the top 1/eta of its rung so far; sync: the whole rung reports first' });
  private readonly forkLrMuls = h('input', { type: 'text', id: 'fork-lr-muls', placeholder: 'optional, e.g. 0.3, 1, 3', spellcheck: 'false', title: 'explicit lr multipliers, one per variant (their count sets the variants); empty: spread over one decade around lr ×' });
  private readonly forkRace = h('div', { className: 'fork-race hidden', id: 'fork-race' });
  // Early stopping (ForkRequest.early_stop_patience / _metric / _min_delta / _every): the
  // other fields show (and are sent) only with a patience >= 1.
  private readonly forkEsPatience = h('input', { type: 'number', id: 'fork-early-stop-patience', value: '0', min: '0', max: String(MAX_EARLY_STOP_PATIENCE), step: '1', title: '0 = off; N = end the fork (completed) when N evaluations in a row have not improved on the best' });
  private readonly forkEsMetric = h('select', { id: 'fork-early-stop-metric', title: 'what early stopping watches: the loss on the selection, or the validation loss' });
  private readonly forkEsMinDelta = h('input', { type: 'number', id: 'fork-early-stop-min-delta', value: '0', min: '0', step: 'any', title: 'an improvement must exceed this (0: any decrease)' });
  private readonly forkEsEvery = h('input', { type: 'number', id: 'fork-early-stop-every', value: '', min: '1', step: '1', title: 'steps between evaluations; empty: budget / 10' });
  private readonly forkEarlyStop = h('div', { className: 'fork-early-stop hidden', id: 'fork-early-stop' });
  private readonly forkError = h('div', { className: 'error-text', id: 'fork-error', role: 'alert' });
  private readonly forkHint = h('div', { className: 'muted', id: 'fork-hint' });
  private readonly mergeMethod = h('select', { id: 'merge-method' });
  private readonly healthCheck = h('select', { id: 'health-check' });
  // CompareRequest.slices as the supervisor reads them: "val", "test", or a fork run (its selection).
  private readonly slicesInput = h('input', { type: 'text', id: 'compare-slices', value: '', placeholder: 'val, test, fork runs… (empty: val + every fork)', spellcheck: 'false' });
  private readonly exportFormat = h('select', { id: 'export-format' });
  private readonly logLevel = h('select', { id: 'log-level' });
  private readonly actionButtons: HTMLButtonElement[] = [];

  readonly charts: ChartGrid;
  readonly histogram: HistogramView;
  readonly heatmap: HeatmapView;
  readonly gpus = new GpuView();

  private readonly refreshRuns = throttle(() => void this.loadRuns(), 300);
  private readonly refreshStatus = throttle(() => void this.loadStatus(), 800);
  private readonly refreshPlans = throttle(() => void this.loadPlans(), 500);
  private readonly refreshHistogram = throttle(() => void this.histogram.refresh(), 400);
  private readonly refreshHeatmap = throttle(() => void this.heatmap.refresh(), 500);

  constructor(private readonly root: HTMLElement) {
    this.charts = new ChartGrid(rpc, perf, (e) => this.reportLoadError(e));
    this.histogram = new HistogramView(rpc, (sel) => this.onBrush(sel), (e) => this.reportLoadError(e));
    this.heatmap = new HeatmapView(rpc, (e) => this.reportLoadError(e));
    // GPU utilisation: poll GetStatus every 2 s while connected and visible.
    window.setInterval(() => {
      if (this.connection?.state === 'connected' && document.visibilityState !== 'hidden') void this.pollGpus();
    }, 2000);
    for (const m of MERGE_METHODS) this.mergeMethod.append(new Option(m, m));
    const metricLabels: Record<string, string> = { slice: 'slice (loss on the selection)', val: 'val (validation loss)' };
    for (const m of RACE_METRICS) this.forkRaceMetric.append(new Option(metricLabels[m] ?? m, m));
    for (const m of RACE_MODES) this.forkRaceMode.append(new Option(m, m));
    for (const m of EARLY_STOP_METRICS) this.forkEsMetric.append(new Option(metricLabels[m] ?? m, m));
    this.healthCheck.append(new Option('all checks', ''));
    for (const c of HEALTH_CHECKS) this.healthCheck.append(new Option(c, c));
    for (const f of EXPORT_FORMATS) this.exportFormat.append(new Option(f.toUpperCase(), f));
    for (const l of ['debug', 'info', 'warning', 'error']) this.logLevel.append(new Option(`${l}+`, l));
    this.logLevel.value = 'info';
    this.restore();
    this.build();
  }

  // ---------------------------------------------------------------- layout

  /** A button whose click runs `onClick` through act(); tracked ones follow the connection state. */
  private button(id: string, label: string, onClick: (b: HTMLButtonElement) => Promise<void>, cls = '', track = true): HTMLButtonElement {
    const b = h('button', { id, className: cls }) as HTMLButtonElement;
    b.textContent = label;
    b.addEventListener('click', () => void this.act(b, onClick));
    if (track) this.actionButtons.push(b);
    return b;
  }

  private section(title: string, id: string, ...body: (Node | string)[]): HTMLElement {
    return h('section', { className: 'card', id }, h('h2', {}, title), ...body);
  }

  private build(): void {
    clear(this.root);
    const header = h(
      'header',
      { className: 'top' },
      h('div', { className: 'brand' }, 'OnTheFly'),
      this.connPill,
      this.sessionInfo,
      h('div', { className: 'spacer' }),
      h('span', { className: 'muted' }, 'run: '),
      this.selectedLabel,
      this.button('btn-pause', 'Pause', () => this.runAction('pause')),
      this.button('btn-resume', 'Resume', () => this.runAction('resume')),
      this.button('btn-test', 'Test', () => this.runAction('test')),
      this.button('btn-stop', 'Stop', () => this.runAction('stop'), 'danger'),
      h('label', { className: 'toggle', title: 'let the planner act on its own' }, this.automode, ' automode'),
    );
    this.automode.addEventListener('change', () => void this.setAutomode(this.automode.checked));

    const runsTable = h(
      'table',
      { className: 'grid-table runs', id: 'runs-table' },
      h('thead', {}, h('tr', {}, h('th', { title: 'check runs for gate / merge / compare' }, '✓'), h('th', {}, 'run'), h('th', {}, 'kind'), h('th', {}, 'status'), h('th', {}, 'step'), h('th', {}, 'ep'), h('th', {}, 'loss'), h('th', {}, 'val'))),
      this.runsBody,
    );

    const forkForm = h(
      'div',
      { className: 'form', id: 'fork-form' },
      h('label', {}, 'selection', this.forkSelect),
      h('label', {}, 'budget steps', this.forkBudget),
      h('label', {}, 'lr ×', this.forkLr),
      h('label', {}, 'adapters rank', this.forkRank),
      h('label', {}, 'name', this.forkName),
      h('label', {}, 'variants', this.forkVariants),
      this.forkRace,
      h('label', {}, 'early stop patience', this.forkEsPatience),
      this.forkEarlyStop,
      this.button('btn-fork', 'Fork', () => this.fork(), 'primary'),
      this.forkError,
      this.forkHint,
    );
    this.forkRace.append(
      h('label', {}, 'race eta', this.forkRaceEta),
      h('label', {}, 'compare on', this.forkRaceMetric),
      h('label', {}, 'race mode', this.forkRaceMode),
      h('label', {}, 'lr multipliers', this.forkLrMuls),
      h('span', { className: 'muted' }, 'the variants race by successive halving; without lr multipliers their lr spreads over one decade around lr ×'),
    );
    this.forkEarlyStop.append(
      h('label', {}, 'stop on', this.forkEsMetric),
      h('label', {}, 'min delta', this.forkEsMinDelta),
      h('label', {}, 'every', this.forkEsEvery, ' steps'),
      h('span', { className: 'muted' }, 'the fork ends, completed, after patience evaluations in a row that do not beat its best by more than min delta (a raced variant: once it goes on to the full budget)'),
    );
    this.forkSelect.addEventListener('change', () => {
      this.histogram.showSpec(this.forkSelect.value);
      this.save();
    });
    for (const el of [this.forkBudget, this.forkLr, this.forkRank, this.forkName, this.forkRaceEta, this.forkRaceMetric, this.forkRaceMode, this.forkEsMetric, this.forkEsMinDelta, this.forkEsEvery]) el.addEventListener('change', () => this.save());
    for (const el of [this.forkEsPatience, this.forkBudget]) {
      el.addEventListener('input', () => this.updateEarlyStopFields());
      el.addEventListener('change', () => {
        this.updateEarlyStopFields();
        this.save();
      });
    }
    for (const el of [this.forkVariants, this.forkLrMuls]) {
      el.addEventListener('input', () => this.updateRaceFields());
      el.addEventListener('change', () => {
        this.updateRaceFields();
        this.save();
      });
    }
    for (const el of [this.forkSelect, this.forkBudget, this.forkLr, this.forkRank, this.forkVariants, this.forkRaceEta, this.forkRaceMetric, this.forkRaceMode, this.forkLrMuls, this.forkEsPatience, this.forkEsMetric, this.forkEsMinDelta, this.forkEsEvery]) {
      el.addEventListener('input', () => (this.forkError.textContent = ''));
    }
    this.updateRaceFields();
    this.updateEarlyStopFields();

    const combine = h(
      'div',
      { className: 'form' },
      this.button('btn-gate', 'Gate checked runs', () => this.gate()),
      h('label', {}, 'merge method', this.mergeMethod),
      this.button('btn-merge', 'Merge checked runs', () => this.merge()),
    );
    this.mergeMethod.addEventListener('change', () => this.save());

    const left = h(
      'div',
      { className: 'col col-left' },
      this.section('Runs', 'runs-card', runsTable),
      this.section('Lineage', 'lineage-card', this.lineageEl, this.relEl),
      this.section('Gate / merge', 'combine-card', combine),
    );
    const center = h(
      'div',
      { className: 'col col-center' },
      this.section('Metrics', 'charts-card', this.charts.el),
      this.section('Per-sample loss', 'hist-card', this.histogram.el, h('h3', {}, 'Fork a specialist on the selection'), forkForm),
      this.section('per-sample loss by epoch', 'heatmap-card', this.heatmap.el),
    );
    const right = h(
      'div',
      { className: 'col col-right' },
      this.section('Root cause', 'errors-card', this.errorsEl),
      this.section('GPU utilisation', 'gpu-card', this.gpus.el),
      this.section('Plans', 'plans-card', h('div', { className: 'row' }, this.button('btn-plans-refresh', 'Refresh', () => this.loadPlans(true), 'small')), this.plansEl),
      this.section(
        'Health',
        'health-card',
        h('div', { className: 'row' }, this.healthCheck, this.button('btn-health', 'Run health check', () => this.health())),
        this.healthEl,
      ),
      this.section(
        'Compare experts',
        'compare-card',
        h('div', { className: 'row' }, h('label', {}, 'slices ', this.slicesInput), this.button('btn-compare', 'Compare checked runs', () => this.compare())),
        this.compareEl,
      ),
      this.section(
        'Export / import',
        'export-card',
        h(
          'div',
          { className: 'row' },
          this.exportFormat,
          this.button('btn-export-slice', 'Export slice', () => this.exportSlice()),
          this.button('btn-export-session', 'Export session', () => this.exportSession()),
          this.button('btn-import-session', 'Import session', () => this.importSession()),
        ),
        this.exportResult,
      ),
      this.section('Logs', 'logs-card', h('div', { className: 'row' }, h('label', {}, 'level ', this.logLevel)), this.logsEl),
    );
    this.logLevel.addEventListener('change', () => this.filterLogs());
    this.healthCheck.addEventListener('change', () => this.save());
    this.slicesInput.addEventListener('change', () => this.save());
    this.exportFormat.addEventListener('change', () => this.save());

    this.root.append(header, this.banner, h('main', { className: 'layout' }, left, center, right), this.toasts);
    this.updateSelectedLabel();
    this.renderErrors();
    this.renderRuns();
  }

  // ---------------------------------------------------------------- state

  private restore(): void {
    const s = api.getState() as Partial<SavedState> | undefined;
    if (!s) return;
    this.selected = s.selectedRun ?? '';
    this.checked = new Set(s.checked ?? []);
    if (s.fork) {
      this.forkSelect.value = s.fork.select || this.forkSelect.value;
      this.forkBudget.value = s.fork.budget || this.forkBudget.value;
      this.forkLr.value = s.fork.lrMul || this.forkLr.value;
      this.forkRank.value = s.fork.rank || this.forkRank.value;
      this.forkName.value = s.fork.name || '';
      this.forkVariants.value = s.fork.variants || this.forkVariants.value;
      this.forkRaceEta.value = s.fork.eta || this.forkRaceEta.value;
      if (s.fork.metric && (RACE_METRICS as readonly string[]).includes(s.fork.metric)) this.forkRaceMetric.value = s.fork.metric;
      if (s.fork.mode && (RACE_MODES as readonly string[]).includes(s.fork.mode)) this.forkRaceMode.value = s.fork.mode;
      this.forkLrMuls.value = s.fork.lrMuls || '';
      this.forkEsPatience.value = s.fork.esPatience || this.forkEsPatience.value;
      if (s.fork.esMetric && (EARLY_STOP_METRICS as readonly string[]).includes(s.fork.esMetric)) this.forkEsMetric.value = s.fork.esMetric;
      this.forkEsMinDelta.value = s.fork.esMinDelta || this.forkEsMinDelta.value;
      this.forkEsEvery.value = s.fork.esEvery || '';
    }
    if (s.exportFormat) this.exportFormat.value = s.exportFormat;
    if (s.mergeMethod) this.mergeMethod.value = s.mergeMethod;
    if (s.healthCheck !== undefined) this.healthCheck.value = s.healthCheck;
    if (s.slices !== undefined) this.slicesInput.value = s.slices;
  }

  private save(): void {
    const s: SavedState = {
      selectedRun: this.selected,
      checked: [...this.checked],
      fork: {
        select: this.forkSelect.value,
        budget: this.forkBudget.value,
        lrMul: this.forkLr.value,
        rank: this.forkRank.value,
        name: this.forkName.value,
        variants: this.forkVariants.value,
        eta: this.forkRaceEta.value,
        metric: this.forkRaceMetric.value,
        mode: this.forkRaceMode.value,
        lrMuls: this.forkLrMuls.value,
        esPatience: this.forkEsPatience.value,
        esMetric: this.forkEsMetric.value,
        esMinDelta: this.forkEsMinDelta.value,
        esEvery: this.forkEsEvery.value,
      },
      exportFormat: this.exportFormat.value as ExportFormat,
      mergeMethod: this.mergeMethod.value as MergeMethod,
      healthCheck: this.healthCheck.value,
      slices: this.slicesInput.value,
    };
    api.setState(s);
  }

  private get run(): string {
    return this.selected || 'main';
  }

  // ---------------------------------------------------------------- messages from the host

  onMessage(msg: HostToWebview): void {
    if (rpc.handle(msg)) return;
    switch (msg.type) {
      case MessageType.Connection:
        this.onConnection(msg.connection);
        return;
      case MessageType.Events:
        this.onEvents(msg.events);
        return;
      case MessageType.SessionChanged:
        this.onSessionChanged(msg.sessionId);
        return;
    }
  }

  private onConnection(c: ConnectionDto): void {
    const was = this.connection?.state;
    this.connection = c;
    this.connPill.textContent = c.state;
    this.connPill.className = `pill conn-${c.state}`;
    // The banner carries the message while not connected; the pill's tooltip always has it.
    this.connPill.title = c.message;
    if (c.state === 'finished' && this.status) {
      const script = this.status.script ? this.status.script.split(/[\\/]/).pop() : '';
      this.sessionInfo.textContent = `${this.status.sessionId}${script ? ` · ${script}` : ''} · finished`;
    }
    const offline = c.state !== 'connected';
    for (const b of this.actionButtons) if (!b.classList.contains('busy')) b.disabled = offline && !b.classList.contains('small');
    this.automode.disabled = offline;
    if (c.state === 'finished') this.showBanner(c.message, 'warning');
    else if (c.state === 'searching') this.showBanner(c.message, 'info');
    else if (c.state === 'reconnecting') this.showBanner(`${c.message} — retrying${c.retryInMs ? ` in ${(c.retryInMs / 1000).toFixed(1)} s` : ''}`, 'warning');
    else this.showBanner('', 'info');
    if (c.state === 'connected' && was !== 'connected') void this.loadAll();
  }

  private onSessionChanged(sessionId: string): void {
    rpc.failAll('the session changed');
    this.status = null;
    this.runs = [];
    this.selected = '';
    this.checked.clear();
    this.errors = [];
    this.seenSeq = 0;
    clear(this.logsEl);
    this.logCount = 0;
    this.renderErrors();
    this.charts.clear();
    this.histogram.clear();
    this.heatmap.clear();
    this.renderRuns();
    this.toast(`now following session ${sessionId}`, 'info');
  }

  private onEvents(events: EventDto[]): void {
    for (const ev of events) {
      if (ev.seq <= this.seenSeq) continue;
      this.seenSeq = ev.seq;
      const run = eventRunId(ev);
      switch (ev.kind) {
        case 'metrics':
          this.charts.addPoints(run, metricPoints(ev));
          break;
        case 'eval': {
          const p = evalMetricPoint(ev);
          if (p) this.charts.addPoints(run, [p]);
          break;
        }
        case 'samples': {
          const s = samplesPayload(ev);
          this.histogram.noteSamples(run, { epoch: s.epoch, p50: s.p50, p90: s.p90, p99: s.p99, mean: s.mean, seen: s.seen });
          break;
        }
        case 'log':
          this.addLog(ev);
          break;
        case 'error':
          this.errors.push({ ...errorPayload(ev), seq: ev.seq, runId: run, time: ev.time });
          this.renderErrors();
          break;
        case 'plan':
          this.refreshPlans();
          break;
        case 'session': {
          const s = sessionPayload(ev);
          this.sessionInfo.dataset.state = s.state;
          this.refreshStatus();
          if (s.message) this.addLogLine(ev.time, 'info', 'session', `${s.state}: ${s.message}`);
          break;
        }
      }
      if (affectsRuns(ev.kind)) {
        this.refreshRuns();
        this.refreshStatus();
      }
      if (affectsDistribution(ev.kind) && run === this.run) this.refreshHistogram();
      if (ev.kind === 'epoch_end' && run === this.run) this.refreshHeatmap();
    }
  }

  // ---------------------------------------------------------------- loading

  private async loadAll(): Promise<void> {
    await Promise.allSettled([this.loadStatus(), this.loadRuns()]);
    const run = this.run;
    this.updateSelectedLabel();
    void this.charts.setRun(run, true);
    this.histogram.setRun(run);
    void this.histogram.refresh();
    this.heatmap.setRun(run);
    void this.heatmap.refresh();
    void this.loadPlans();
  }

  private async loadStatus(): Promise<void> {
    try {
      const s = await rpc.call('getStatus', {});
      this.status = s;
      this.automode.checked = s.automode;
      const script = s.script ? s.script.split(/[\\/]/).pop() : '';
      this.sessionInfo.textContent = `${s.sessionId}${script ? ` · ${script}` : ''} · ${s.state}`;
      this.sessionInfo.title = s.sessionDir;
      this.gpus.update(s.gpus ?? []);
      this.renderRuns();
    } catch (e) {
      this.reportLoadError(e);
    }
  }

  private async pollGpus(): Promise<void> {
    try {
      this.gpus.update((await rpc.call('getStatus', {})).gpus ?? []);
    } catch {
      // the connection banner and loadStatus report failures
    }
  }

  private async loadRuns(): Promise<void> {
    try {
      this.runs = await rpc.call('listRuns', {});
    } catch (e) {
      this.reportLoadError(e);
      return;
    }
    if (!this.selected || !this.runs.some((r) => r.runId === this.selected || r.name === this.selected)) {
      const main = this.runs.find((r) => r.kind === 'main') ?? this.runs[0];
      if (main && main.runId !== this.selected) this.select(main.runId);
    }
    for (const id of [...this.checked]) if (!this.runs.some((r) => r.runId === id)) this.checked.delete(id);
    this.renderRuns();
  }

  private async loadPlans(loud = false): Promise<void> {
    try {
      const plans = await rpc.call('listPlans', {});
      this.renderPlans(plans);
    } catch (e) {
      this.renderPlansError(e);
      if (loud) throw e;
    }
  }

  /** Background loads report once per code, so an unbuilt RPC does not flood the toasts. */
  private readonly reported = new Set<string>();
  private reportLoadError(e: unknown): void {
    const key = e instanceof RpcFailure ? `${e.method}:${e.error.codeName}` : errorText(e);
    if (e instanceof RpcFailure && e.error.codeName === 'UNAVAILABLE') return; // the banner says it
    // "No data yet" for a chart or the histogram: the panel itself says so.
    if (e instanceof RpcFailure && (e.method === 'getMetrics' || e.method === 'getLossDistribution') && (e.error.codeName === 'NOT_FOUND' || e.error.codeName === 'FAILED_PRECONDITION')) return;
    if (this.reported.has(key)) return;
    this.reported.add(key);
    this.toast(errorText(e), 'warning');
  }

  // ---------------------------------------------------------------- runs / lineage

  select(runId: string): void {
    if (runId === this.selected) return;
    this.selected = runId;
    this.save();
    this.updateSelectedLabel();
    this.renderRuns();
    void this.charts.setRun(runId);
    this.histogram.setRun(runId);
    this.heatmap.setRun(runId);
  }

  private updateSelectedLabel(): void {
    const r = this.runs.find((x) => x.runId === this.selected);
    this.selectedLabel.textContent = r ? `${r.name} (${r.status})` : this.selected || 'main';
    this.selectedLabel.dataset.run = this.run;
  }

  private renderRuns(): void {
    clear(this.runsBody);
    const workers = new Map((this.status?.workers ?? []).map((w) => [w.runId, w]));
    for (const r of this.runs) {
      const box = h('input', { type: 'checkbox', className: 'run-check', 'data-run': r.runId }) as HTMLInputElement;
      box.checked = this.checked.has(r.runId);
      box.addEventListener('click', (e) => e.stopPropagation());
      box.addEventListener('change', () => {
        if (box.checked) this.checked.add(r.runId);
        else this.checked.delete(r.runId);
        this.save();
      });
      const w = workers.get(r.runId);
      // The worker state adds news only while the run is live (e.g. "running · worker starting").
      const live = r.status === 'running' || r.status === 'paused' || r.status === 'pending';
      const statusCell = h('td', {}, h('span', { className: `badge status-${r.status}` }, r.status), live && w && w.state !== r.status ? h('span', { className: 'muted' }, ` · worker ${w.state}`) : null);
      const row = h(
        'tr',
        { className: `run-row${r.runId === this.selected ? ' selected' : ''}`, 'data-run': r.runId, 'data-kind': r.kind, 'data-status': r.status, title: r.error || r.runId },
        h('td', {}, box),
        h('td', {}, r.name, r.error ? h('span', { className: 'err-dot', title: r.error }, ' ⚠') : null),
        h('td', {}, r.kind),
        statusCell,
        h('td', {}, fmtInt(r.step)),
        h('td', {}, r.epoch),
        h('td', {}, fmt(r.lastLoss)),
        h('td', {}, fmt(r.valLoss)),
      );
      row.addEventListener('click', () => this.select(r.runId));
      this.runsBody.append(row);
    }
    if (!this.runs.length) this.runsBody.append(h('tr', {}, h('td', { colspan: 8, className: 'muted' }, 'no runs yet')));
    renderLineage(this.lineageEl, this.runs, this.selected, (id) => this.select(id));
    const rel = relatives(this.runs, this.selected);
    this.relEl.textContent = this.selected ? `${this.selected}: parents ${rel.parents.join(', ') || '—'} · children ${rel.children.join(', ') || '—'}` : '';
    this.updateSelectedLabel();
  }

  // ---------------------------------------------------------------- actions

  /** Runs an action with its button busy; errors become toasts, the UI never freezes. */
  private async act(b: HTMLButtonElement, fn: (b: HTMLButtonElement) => Promise<void>): Promise<void> {
    if (b.classList.contains('busy')) return;
    const label = b.textContent ?? '';
    b.classList.add('busy');
    b.disabled = true;
    b.textContent = `${label}…`;
    try {
      await fn(b);
    } catch (e) {
      this.toast(errorText(e), 'error');
    } finally {
      b.classList.remove('busy');
      b.textContent = label;
      b.disabled = this.connection?.state !== 'connected' && !b.classList.contains('small');
    }
  }

  private reportAction(label: string, a: ActionDto): void {
    if (a.ok) this.toast(`${label}: ${a.message || 'done'}${a.runId ? ` (${a.runId})` : ''}`, 'info');
    else this.toast(`${label} refused: ${a.message || 'no reason given'}`, 'warning');
  }

  private async runAction(method: 'pause' | 'resume' | 'test' | 'stop'): Promise<void> {
    const label = method.charAt(0).toUpperCase() + method.slice(1);
    const a = await rpc.call(method, { run: this.run });
    this.reportAction(`${label} ${this.run}`, a);
    this.refreshRuns();
    this.refreshStatus();
  }

  private async setAutomode(enabled: boolean): Promise<void> {
    try {
      const a = await rpc.call('setAutomode', { enabled });
      this.reportAction(`Automode ${enabled ? 'on' : 'off'}`, a);
      if (!a.ok) this.automode.checked = !enabled;
    } catch (e) {
      this.automode.checked = !enabled;
      this.toast(errorText(e), 'error');
    }
    this.refreshStatus();
  }

  private onBrush(sel: QuantileSelection): void {
    this.forkSelect.value = sel.spec;
    this.forkHint.textContent = `from the brushed loss range: ≈${fmtInt(sel.samples)} samples`;
    this.save();
  }

  /**
   * The race fields show (and are sent) only with 2 or more variants. Explicit lr
   * multipliers set the number of variants: the variants box follows their count and is
   * read-only while there are any.
   */
  private updateRaceFields(): void {
    const mulsText = this.forkLrMuls.value.trim();
    if (mulsText) {
      const muls = parseLrMuls(mulsText);
      if (Array.isArray(muls) && muls.length >= 2 && muls.length <= MAX_VARIANTS) this.forkVariants.value = String(muls.length);
    }
    this.forkVariants.readOnly = !!mulsText;
    this.forkVariants.title = mulsText ? 'set by the count of the lr multipliers' : `1 = one fork; 2..${MAX_VARIANTS} = race that many variants by successive halving, the winner completes`;
    const raced = !!mulsText || Number(this.forkVariants.value) >= 2;
    this.forkRace.classList.toggle('hidden', !raced);
    for (const el of [this.forkRaceEta, this.forkRaceMetric, this.forkRaceMode, this.forkLrMuls]) el.disabled = !raced;
  }

  /**
   * The early-stop fields show (and are sent) only with a patience >= 1; the cadence's
   * placeholder says the supervisor's default for the budget (budget / 10).
   */
  private updateEarlyStopFields(): void {
    const on = Number(this.forkEsPatience.value) >= 1;
    this.forkEarlyStop.classList.toggle('hidden', !on);
    for (const el of [this.forkEsMetric, this.forkEsMinDelta, this.forkEsEvery]) el.disabled = !on;
    const budget = Number(this.forkBudget.value);
    this.forkEsEvery.placeholder = Number.isInteger(budget) && budget > 0 ? `${earlyStopCadence(effectiveBudget(budget))} (budget / 10)` : 'budget / 10';
  }

  /** Checks the fork form (select spec, numbers, race and early-stop fields); its ForkParams, or a one-line error. */
  private forkParams(): { params: ForkParams } | { error: string } {
    const select = this.forkSelect.value.trim();
    const bad = validateSelectSpec(select);
    if (bad) return { error: bad };
    const budgetSteps = Number(this.forkBudget.value);
    const lrMul = Number(this.forkLr.value);
    const adaptersRank = Number(this.forkRank.value);
    if (!Number.isInteger(budgetSteps) || budgetSteps <= 0) return { error: 'budget steps must be a positive integer' };
    if (!Number.isFinite(lrMul) || lrMul <= 0) return { error: 'the lr multiplier must be > 0' };
    if (!Number.isInteger(adaptersRank) || adaptersRank < 0) return { error: 'adapters rank must be an integer >= 0 (0 = full weights)' };
    // Hidden race fields (fewer than 2 variants) are not sent.
    const raced = !this.forkRace.classList.contains('hidden');
    const race = forkRaceFromForm({
      variants: this.forkVariants.value,
      eta: raced ? this.forkRaceEta.value : '',
      metric: raced ? this.forkRaceMetric.value : '',
      mode: raced ? this.forkRaceMode.value : '',
      lrMuls: raced ? this.forkLrMuls.value : '',
    });
    if ('error' in race) return race;
    // Hidden early-stop fields (patience 0 or empty) are not sent.
    const stops = !this.forkEarlyStop.classList.contains('hidden');
    const early = forkEarlyStopFromForm(
      {
        patience: this.forkEsPatience.value,
        metric: stops ? this.forkEsMetric.value : '',
        minDelta: stops ? this.forkEsMinDelta.value : '',
        every: stops ? this.forkEsEvery.value : '',
      },
      budgetSteps,
    );
    if ('error' in early) return early;
    return { params: { run: this.run, select, budgetSteps, lrMul, adaptersRank, name: this.forkName.value.trim() || undefined, ...race.race, ...early.earlyStop } };
  }

  private async fork(): Promise<void> {
    this.updateRaceFields();
    this.updateEarlyStopFields();
    const checked = this.forkParams();
    // A bad value: the reason next to the form, nothing sent.
    if ('error' in checked) {
      this.forkError.textContent = `Fork: ${checked.error}`;
      return;
    }
    this.forkError.textContent = '';
    const p = checked.params;
    const a = await rpc.call('fork', p);
    const n = p.variants ?? 1;
    this.reportAction(n >= 2 ? `Race of ${n} variants of ${this.run} on ${p.select}` : `Fork of ${this.run} on ${p.select}`, a);
    this.refreshRuns();
  }

  private checkedRuns(): string[] {
    // The selected run first (the gate wants the parent first), then the others in table order.
    const list = this.runs.map((r) => r.runId).filter((id) => this.checked.has(id));
    if (this.checked.has(this.selected)) return [this.selected, ...list.filter((id) => id !== this.selected)];
    return list;
  }

  private async gate(): Promise<void> {
    const runs = this.checkedRuns();
    if (runs.length < 2) throw new Error('Gate: check the parent and at least one specialist in the runs table');
    this.reportAction(`Gate over ${runs.join(', ')}`, await rpc.call('gate', { runs }));
    this.refreshRuns();
  }

  private async merge(): Promise<void> {
    const runs = this.checkedRuns();
    if (runs.length < 1) throw new Error('Merge: check the runs to merge in the runs table');
    const method = this.mergeMethod.value as MergeMethod;
    this.reportAction(`Merge (${method}) of ${runs.join(', ')}`, await rpc.call('merge', { method, runs }));
    this.refreshRuns();
  }

  private async health(): Promise<void> {
    clear(this.healthEl);
    this.healthEl.append(h('div', { className: 'muted' }, `checking ${this.run}…`));
    try {
      const rep = await rpc.call('runHealthCheck', { run: this.run, check: this.healthCheck.value || undefined });
      clear(this.healthEl);
      const body = h('tbody');
      for (const v of rep.verdicts) {
        const numbers = Object.entries(v.numbers)
          .map(([k, x]) => `${k}=${typeof x === 'number' ? fmt(x) : JSON.stringify(x)}`)
          .join(' ');
        body.append(h('tr', { 'data-check': v.check }, h('td', {}, v.check), h('td', {}, h('span', { className: `badge verdict-${v.verdict}` }, v.verdict)), h('td', {}, v.hint, numbers ? h('div', { className: 'muted mono' }, numbers) : null)));
      }
      this.healthEl.append(h('table', { className: 'grid-table' }, h('thead', {}, h('tr', {}, h('th', {}, 'check'), h('th', {}, 'verdict'), h('th', {}, 'why'))), body));
      if (!rep.verdicts.length) this.healthEl.append(h('div', { className: 'muted' }, 'no verdicts'));
    } catch (e) {
      clear(this.healthEl);
      this.healthEl.append(h('div', { className: 'error-text' }, errorText(e)));
      throw e;
    }
  }

  private async compare(): Promise<void> {
    const runs = this.checkedRuns().length ? this.checkedRuns() : [this.run];
    const slices = this.slicesInput.value
      .split(',')
      .map((s) => s.trim())
      .filter(Boolean);
    clear(this.compareEl);
    try {
      const c = await rpc.call('compareExperts', { runs, slices });
      const head = h('tr', {}, h('th', {}, 'run \\ slice'), ...c.slices.map((s) => h('th', {}, s)));
      const body = h('tbody');
      c.runs.forEach((r, i) => {
        const row = c.losses[i] ?? [];
        const best = c.slices.map((_, j) => Math.min(...c.losses.map((l) => l[j] ?? Infinity)));
        body.append(h('tr', {}, h('td', {}, r), ...c.slices.map((_, j) => h('td', { className: row[j] !== null && row[j] === best[j] ? 'best' : '' }, fmt(row[j])))));
      });
      this.compareEl.append(h('table', { className: 'grid-table', id: 'compare-table' }, h('thead', {}, head), body));
    } catch (e) {
      this.compareEl.append(h('div', { className: 'error-text' }, errorText(e)));
      throw e;
    }
  }

  private showExport(what: string, r: ExportDto | null): void {
    if (r === null) {
      this.exportResult.textContent = `${what}: cancelled`;
      return;
    }
    const text = r.ok
      ? `${what}: ${r.path}${r.rows ? ` · ${fmtInt(r.rows)} rows` : ''}${r.sha256 ? ` · sha256 ${r.sha256.slice(0, 12)}…` : ''}${r.message ? ` · ${r.message}` : ''}`
      : `${what} refused: ${r.message}`;
    this.exportResult.textContent = text;
    this.toast(text, r.ok ? 'info' : 'warning');
  }

  private async exportSlice(): Promise<void> {
    const select = this.forkSelect.value.trim() || 'all';
    const bad = validateSelectSpec(select);
    if (bad) throw new Error(`Export slice: ${bad}`);
    this.showExport(`Export ${select}`, await rpc.call('exportSlice', { run: this.run, select, format: this.exportFormat.value as ExportFormat }, 600_000));
  }

  private async exportSession(): Promise<void> {
    this.showExport('Export session', await rpc.call('exportSession', {}, 900_000));
  }

  private async importSession(): Promise<void> {
    this.showExport('Import session', await rpc.call('importSession', {}, 900_000));
    this.refreshRuns();
  }

  // ---------------------------------------------------------------- plans

  private renderPlansError(e: unknown): void {
    clear(this.plansEl);
    this.plansEl.append(h('div', { className: 'muted' }, `plans unavailable: ${errorText(e)}`));
  }

  private renderPlans(plans: PlanDto[]): void {
    clear(this.plansEl);
    if (!plans.length) {
      this.plansEl.append(h('div', { className: 'muted' }, 'no plan cards (the planner proposes them when it detects something)'));
      return;
    }
    for (const p of plans.slice().sort((a, b) => b.created - a.created)) {
      const actions = h('div', { className: 'row' });
      const editor = h('div', { className: 'plan-editor hidden' });
      if (p.status === 'proposed') {
        actions.append(
          this.button(`plan-approve-${p.planId}`, 'Approve', async () => {
            this.reportAction(`Approve ${p.planId}`, await rpc.call('approvePlan', { planId: p.planId }));
            this.refreshPlans();
          }, 'primary small-btn', false),
          this.button(`plan-edit-${p.planId}`, 'Edit', async () => {
            editor.classList.toggle('hidden');
          }, 'small-btn', false),
          this.button(`plan-reject-${p.planId}`, 'Reject', async () => {
            this.reportAction(`Reject ${p.planId}`, await rpc.call('rejectPlan', { planId: p.planId }));
            this.refreshPlans();
          }, 'small-btn', false),
        );
        const text = h('textarea', { rows: 4, spellcheck: 'false' }) as HTMLTextAreaElement;
        text.value = [`selection=${p.selection}`, `budget_steps=${p.budgetSteps}`, ...Object.entries(p.recipe).map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`)].join('\n');
        editor.append(
          h('div', { className: 'muted' }, 'one KEY=VALUE per line'),
          text,
          this.button(`plan-save-${p.planId}`, 'Save edits', async () => {
            const values: Record<string, string> = {};
            for (const line of text.value.split('\n')) {
              const t = line.trim();
              if (!t) continue;
              const i = t.indexOf('=');
              if (i <= 0) throw new Error(`Edit plan: "${t}" is not KEY=VALUE`);
              values[t.slice(0, i).trim()] = t.slice(i + 1).trim();
            }
            this.reportAction(`Edit ${p.planId}`, await rpc.call('editPlan', { planId: p.planId, values }));
            this.refreshPlans();
          }, 'small-btn', false),
        );
      }
      const diag = Object.keys(p.diagnostics).length ? h('details', {}, h('summary', {}, 'diagnostics'), h('pre', { className: 'mono' }, JSON.stringify(p.diagnostics, null, 2))) : null;
      this.plansEl.append(
        h(
          'div',
          { className: `plan plan-${p.status}`, 'data-plan': p.planId },
          h('div', { className: 'plan-head' }, h('strong', {}, p.action), ' ', h('span', { className: `badge plan-status-${p.status}` }, p.status), h('span', { className: 'muted' }, ` ${p.runId} · ${p.planId}`)),
          h('div', {}, p.reason),
          h('div', { className: 'muted mono' }, `${p.selection || '—'} · budget ${fmtInt(p.budgetSteps)} steps · cooldown ${fmtInt(p.cooldownSteps)}`),
          Object.keys(p.recipe).length ? h('div', { className: 'muted mono' }, JSON.stringify(p.recipe)) : null,
          diag,
          actions,
          editor,
        ),
      );
    }
    const offline = this.connection?.state !== 'connected';
    for (const b of Array.from(this.plansEl.querySelectorAll('button'))) (b as HTMLButtonElement).disabled = offline;
  }

  // ---------------------------------------------------------------- logs / errors

  private addLog(ev: EventDto): void {
    const l = logPayload(ev);
    this.addLogLine(ev.time, l.level, l.workerId || eventRunId(ev), l.text);
  }

  private static readonly LEVELS = ['debug', 'info', 'warning', 'error'];

  private addLogLine(time: number, level: string, who: string, text: string): void {
    const t = time ? new Date(time * 1000).toLocaleTimeString() : '';
    const line = h('div', { className: `log log-${level}`, 'data-level': level }, h('span', { className: 'muted' }, `${t} ${who} `), text);
    const min = Dashboard.LEVELS.indexOf(this.logLevel.value);
    if (Dashboard.LEVELS.indexOf(level) < min) line.classList.add('hidden');
    const atBottom = this.logsEl.scrollTop + this.logsEl.clientHeight >= this.logsEl.scrollHeight - 4;
    this.logsEl.append(line);
    this.logCount++;
    if (this.logCount > 1500) {
      this.logsEl.firstChild?.remove();
      this.logCount--;
    }
    if (atBottom) this.logsEl.scrollTop = this.logsEl.scrollHeight;
  }

  private filterLogs(): void {
    const min = Dashboard.LEVELS.indexOf(this.logLevel.value);
    for (const el of Array.from(this.logsEl.children)) {
      const lvl = Dashboard.LEVELS.indexOf((el as HTMLElement).dataset.level ?? 'info');
      el.classList.toggle('hidden', lvl < min);
    }
  }

  private renderErrors(): void {
    clear(this.errorsEl);
    if (!this.errors.length) {
      this.errorsEl.append(h('div', { className: 'muted' }, 'no worker failed'));
      return;
    }
    // The earliest failure is the root cause; later ones are usually its consequences.
    this.errors.forEach((e, i) => {
      const loc = errorLocation(e);
      this.errorsEl.append(
        h(
          'div',
          { className: `error-box${i === 0 ? ' root-cause' : ''}`, 'data-seq': e.seq },
          h('div', { className: 'error-title' }, i === 0 ? 'root cause · ' : '', `${e.runId || '?'} / ${e.workerId || '?'}`),
          h('div', { className: 'error-message' }, e.message),
          loc ? h('div', { className: 'mono error-loc' }, loc) : null,
          e.traceback ? h('details', { open: i === 0 }, h('summary', {}, 'traceback'), h('pre', { className: 'mono' }, e.traceback)) : null,
        ),
      );
    });
  }

  // ---------------------------------------------------------------- chrome

  private showBanner(text: string, level: Level): void {
    this.banner.textContent = text;
    this.banner.className = text ? `banner banner-${level}` : 'banner hidden';
  }

  toast(text: string, level: Level): void {
    const close = h('button', { className: 'toast-close', title: 'dismiss' }, '×');
    const t = h('div', { className: `toast toast-${level}`, role: level === 'error' ? 'alert' : 'status' }, h('span', { className: 'toast-text' }, text), close);
    close.addEventListener('click', () => t.remove());
    this.toasts.append(t);
    while (this.toasts.children.length > 6) this.toasts.firstChild?.remove();
    window.setTimeout(() => t.remove(), level === 'error' ? 20_000 : 8_000);
  }
}

// ---------------------------------------------------------------- boot

const root = document.getElementById('app') ?? document.body;
const dashboard = new Dashboard(root);

window.addEventListener('message', (e: MessageEvent) => {
  const msg = decodeHostMessage(e.data);
  if (msg) dashboard.onMessage(msg);
});

// What the browser test reads: timings and how many points each chart shows.
Object.assign(window as unknown as Record<string, unknown>, {
  __ontheflyPerf: perf,
  __ontheflyDebug: {
    pointCounts: () => dashboard.charts.pointCounts(),
    brushLoss: (lo: number, hi: number) => dashboard.histogram.brushLoss(lo, hi),
    distribution: () => dashboard.histogram.distribution,
    heatmap: () => ({ cells: dashboard.heatmap.cellsDrawn, epochs: dashboard.heatmap.data?.epochs ?? [] }),
    select: (run: string) => dashboard.select(run),
  },
});

api.postMessage({ type: MessageType.Ready });
