/**
 * Finds the live supervisor of a workspace and stays connected to it.
 *
 * The supervisor writes `<workspace>/.onthefly/sessions/latest/connection.json`
 * ({host, port, token, session_id, pid}). The watcher reads it, probes the supervisor
 * (GetStatus), then follows ControlService.WatchEvents from the last sequence number it
 * saw, so a reconnect — after a supervisor restart, a dropped connection or a new
 * connection file — loses no event. It retries with exponential backoff, and reacts at
 * once when the file changes. A connection file whose supervisor process is gone is a
 * finished session.
 *
 * No vscode import: the extension, the relay's fake-server test and the browser
 * end-to-end test all run this same code.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ConnectionDto, ConnectionState, EventDto } from '../shared/protocol';
import { ControlClient, type ConnectionInfo, type EventStream, RpcError, parseConnectionInfo } from './client';
import { eventFromProto } from './convert';

export interface Disposable {
  dispose(): void;
}

type Listener<T> = (value: T) => void;

/** A tiny event emitter (vscode.EventEmitter without vscode). */
export class Emitter<T> implements Disposable {
  private listeners = new Set<Listener<T>>();

  on(listener: Listener<T>): Disposable {
    this.listeners.add(listener);
    return { dispose: () => this.listeners.delete(listener) };
  }

  fire(value: T): void {
    for (const l of [...this.listeners]) {
      try {
        l(value);
      } catch (e) {
        // One faulty listener must not break the others (or the stream).
        console.error('[onthefly] listener failed:', e);
      }
    }
  }

  dispose(): void {
    this.listeners.clear();
  }
}

export interface SessionWatcherOptions {
  /** Absolute path of connection.json (usually <workspace>/.onthefly/sessions/latest/connection.json). */
  connectionFile: string;
  protoPath: string;
  /** How often to stat the connection file (ms). */
  pollMs?: number;
  minBackoffMs?: number;
  maxBackoffMs?: number;
  /** Deadline of the GetStatus probe (ms). */
  probeTimeoutMs?: number;
  /** Default deadline of unary calls (ms). */
  callTimeoutMs?: number;
  /** Batch events for this long before handing them on (ms); keeps the webview message rate sane. */
  eventBatchMs?: number;
  /** Whether a process is alive; injectable for tests. */
  isPidAlive?: (pid: number) => boolean;
  log?: (line: string) => void;
}

const RECENT_KINDS = new Set(['log', 'error', 'session', 'plan', 'run_status']);
const RECENT_LIMIT = 2000;

export function pidAlive(pid: number): boolean {
  if (!pid || pid <= 0) return true; // unknown: do not call the session finished on a guess
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export function finishedMessage(sessionId: string): string {
  return (
    `session ${sessionId || '(unknown)'} finished; read-only views need a live supervisor: ` +
    `run \`onthefly serve ${sessionId || 'SESSION'}\``
  );
}

export class SessionWatcher implements Disposable {
  readonly onConnection = new Emitter<ConnectionDto>();
  readonly onEvents = new Emitter<EventDto[]>();
  /** A different session is now live; fired before its first events. */
  readonly onSessionChanged = new Emitter<string>();

  private readonly opts: Required<Omit<SessionWatcherOptions, 'log'>> & { log: (line: string) => void };
  private state: ConnectionDto;
  private info: ConnectionInfo | undefined;
  private ctl: ControlClient | undefined;
  private stream: EventStream | undefined;
  private lastSeq = 0;
  private sessionId = '';
  private backoffMs: number;
  private timer: NodeJS.Timeout | undefined;
  private attempting = false;
  private again = false;
  private disposed = false;
  private started = false;
  private pending: EventDto[] = [];
  /** Recent events a freshly (re)loaded view needs and cannot re-query: logs, errors, session state. */
  private recent: EventDto[] = [];
  private flushTimer: NodeJS.Timeout | undefined;
  private readonly onFileChange = (curr: fs.Stats, prev: fs.Stats): void => {
    if (curr.mtimeMs !== prev.mtimeMs || curr.ino !== prev.ino || curr.size !== prev.size) this.kick();
  };

  constructor(options: SessionWatcherOptions) {
    this.opts = {
      pollMs: 1000,
      minBackoffMs: 250,
      maxBackoffMs: 5000,
      probeTimeoutMs: 3000,
      callTimeoutMs: 15_000,
      eventBatchMs: 16,
      isPidAlive: pidAlive,
      log: () => undefined,
      ...options,
    } as SessionWatcher['opts'];
    this.backoffMs = this.opts.minBackoffMs;
    this.state = {
      state: 'searching',
      message: 'looking for a session',
      sessionId: '',
      connectionFile: options.connectionFile,
      address: '',
      lastSeq: 0,
      retryInMs: 0,
    };
  }

  get connection(): ConnectionDto {
    return { ...this.state, lastSeq: this.lastSeq };
  }

  /** The client of the live supervisor; undefined unless connected. */
  get client(): ControlClient | undefined {
    return this.state.state === 'connected' ? this.ctl : undefined;
  }

  /** The client, or an UNAVAILABLE error that says why there is none. */
  requireClient(): ControlClient {
    const c = this.client;
    if (c) return c;
    throw new RpcError(14, 'UNAVAILABLE', `not connected to a supervisor (${this.state.message})`);
  }

  /** The last RECENT_LIMIT log / error / session / plan / run_status events of this session. */
  recentEvents(): EventDto[] {
    return this.recent.slice();
  }

  get lastEventSeq(): number {
    return this.lastSeq;
  }

  start(): void {
    if (this.started || this.disposed) return;
    this.started = true;
    fs.watchFile(this.opts.connectionFile, { interval: this.opts.pollMs, persistent: false }, this.onFileChange);
    this.kick();
  }

  get connectionFile(): string {
    return this.opts.connectionFile;
  }

  /** Follow another connection file (a settings change, another workspace folder). */
  retarget(connectionFile: string): void {
    if (this.disposed || connectionFile === this.opts.connectionFile) return;
    if (this.started) fs.unwatchFile(this.opts.connectionFile, this.onFileChange);
    this.opts.connectionFile = connectionFile;
    this.dropClient();
    this.state = { ...this.state, state: 'searching', connectionFile };
    if (this.started) fs.watchFile(connectionFile, { interval: this.opts.pollMs, persistent: false }, this.onFileChange);
    this.kick();
  }

  /** Re-read the connection file and try now (file watcher, "Reconnect" command). */
  kick(): void {
    if (this.disposed) return;
    this.backoffMs = this.opts.minBackoffMs;
    this.schedule(0);
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    fs.unwatchFile(this.opts.connectionFile, this.onFileChange);
    if (this.timer) clearTimeout(this.timer);
    if (this.flushTimer) clearTimeout(this.flushTimer);
    this.stream?.cancel();
    this.ctl?.close();
    this.onConnection.dispose();
    this.onEvents.dispose();
    this.onSessionChanged.dispose();
  }

  private setState(state: ConnectionState, message: string, retryInMs = 0): void {
    const prev = this.state;
    const unchanged = prev.state === state && prev.message === message && prev.sessionId === this.sessionId && prev.retryInMs === retryInMs;
    this.state = {
      state,
      message,
      sessionId: this.sessionId,
      connectionFile: this.opts.connectionFile,
      address: this.ctl?.address ?? '',
      lastSeq: this.lastSeq,
      retryInMs,
    };
    if (unchanged) return; // e.g. the slow re-check of a finished session: nothing new to say
    this.opts.log(`[${state}] ${message}`);
    this.onConnection.fire(this.connection);
  }

  private schedule(delayMs: number): void {
    if (this.disposed) return;
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = undefined;
      void this.attempt();
    }, delayMs);
  }

  private retryLater(state: ConnectionState, message: string): void {
    const delay = this.backoffMs;
    this.backoffMs = Math.min(this.opts.maxBackoffMs, this.backoffMs * 2);
    this.setState(state, message, delay);
    this.schedule(delay);
  }

  /** The id of the session folder the connection file lives in, if that folder exists (no live supervisor). */
  private finishedSessionId(): string | undefined {
    const dir = path.dirname(this.opts.connectionFile);
    try {
      const real = fs.realpathSync(dir);
      if (!fs.statSync(real).isDirectory()) return undefined;
      // A session folder holds session.db; anything else (an empty `latest` parent) is no session.
      if (!fs.existsSync(path.join(real, 'session.db'))) return undefined;
      return path.basename(real);
    } catch {
      return undefined;
    }
  }

  private readInfo(): ConnectionInfo | undefined {
    let text: string;
    try {
      text = fs.readFileSync(this.opts.connectionFile, 'utf8');
    } catch {
      return undefined;
    }
    return parseConnectionInfo(text, this.opts.connectionFile);
  }

  private async attempt(): Promise<void> {
    if (this.disposed) return;
    if (this.attempting) {
      this.again = true;
      return;
    }
    this.attempting = true;
    try {
      await this.tryConnect();
    } finally {
      this.attempting = false;
      if (this.again && !this.disposed) {
        this.again = false;
        this.schedule(0);
      }
    }
  }

  private async tryConnect(): Promise<void> {
    let info: ConnectionInfo | undefined;
    try {
      info = this.readInfo();
    } catch (e) {
      this.retryLater('reconnecting', (e as Error).message);
      return;
    }
    if (!info) {
      this.dropClient();
      // The file watcher calls kick() when it appears; no need to spin.
      const finished = this.finishedSessionId();
      if (finished !== undefined) {
        // The supervisor removes connection.json when it exits: the session folder without
        // it is a finished session.
        if (this.sessionId && finished && finished !== this.sessionId) {
          this.sessionId = finished;
          this.lastSeq = 0;
          this.recent = [];
          this.onSessionChanged.fire(finished);
        } else if (!this.sessionId) {
          this.sessionId = finished;
        }
        this.setState('finished', finishedMessage(finished));
        return;
      }
      this.setState('searching', `no session yet: ${this.opts.connectionFile} does not exist. Start one with "OnTheFly: Run Script" or \`onthefly run train.py\`.`);
      return;
    }

    const same =
      this.info && this.ctl && this.info.host === info.host && this.info.port === info.port && this.info.token === info.token && this.info.session_id === info.session_id;
    if (same && this.state.state === 'connected' && this.stream) return; // nothing changed
    if (!same) {
      this.dropClient();
      this.info = info;
      this.ctl = new ControlClient(info, this.opts.protoPath, this.opts.callTimeoutMs);
    }
    if (info.session_id !== this.sessionId) {
      const previous = this.sessionId;
      this.sessionId = info.session_id;
      this.lastSeq = 0;
      this.pending = [];
      this.recent = [];
      if (previous) this.onSessionChanged.fire(info.session_id);
    }
    const ctl = this.ctl as ControlClient;
    if (this.state.state !== 'reconnecting' && this.state.state !== 'finished') this.setState('connecting', `connecting to ${ctl.address}`);

    try {
      const status = await ctl.call('GetStatus', {}, { timeoutMs: this.opts.probeTimeoutMs });
      if (this.disposed || ctl !== this.ctl) return;
      if (status.session_id && status.session_id !== this.sessionId) {
        // connection.json and the server disagree: trust the server (it is what we talk to).
        const previous = this.sessionId;
        this.sessionId = status.session_id;
        this.lastSeq = 0;
        this.recent = [];
        if (previous) this.onSessionChanged.fire(status.session_id);
      }
    } catch (err) {
      if (this.disposed || ctl !== this.ctl) return;
      const e = RpcError.from(err);
      if (!this.opts.isPidAlive(info.pid)) {
        this.setState('finished', finishedMessage(info.session_id));
        // Keep an eye on it slowly: `onthefly serve` may bring a supervisor back on the same file.
        this.backoffMs = this.opts.maxBackoffMs;
        this.schedule(this.opts.maxBackoffMs);
        return;
      }
      const why = e.code === 16 ? `the supervisor rejected the session token (stale ${this.opts.connectionFile}?)` : `${ctl.address} did not answer (${e.codeName}: ${e.details})`;
      this.retryLater('reconnecting', why);
      return;
    }

    this.backoffMs = this.opts.minBackoffMs;
    this.openStream(ctl);
    this.setState('connected', `connected to session ${this.sessionId} at ${ctl.address}`);
  }

  private openStream(ctl: ControlClient): void {
    this.stream?.cancel();
    const stream = ctl.watchEvents(this.lastSeq, {
      onEvent: (pe) => {
        if (stream !== this.stream) return;
        const ev = eventFromProto(pe);
        if (ev.seq <= this.lastSeq) return; // replay overlap after a reconnect
        this.lastSeq = ev.seq;
        this.pending.push(ev);
        if (!this.flushTimer) this.flushTimer = setTimeout(() => this.flush(), this.opts.eventBatchMs);
      },
      onEnd: (err) => {
        if (stream !== this.stream || this.disposed) return;
        this.stream = undefined;
        this.flush();
        const why = err ? `event stream lost (${err.codeName}: ${err.details})` : 'the supervisor closed the event stream';
        this.retryLater('reconnecting', why);
      },
    });
    this.stream = stream;
  }

  private flush(): void {
    if (this.flushTimer) clearTimeout(this.flushTimer);
    this.flushTimer = undefined;
    if (!this.pending.length) return;
    const batch = this.pending;
    this.pending = [];
    for (const ev of batch) if (RECENT_KINDS.has(ev.kind)) this.recent.push(ev);
    if (this.recent.length > RECENT_LIMIT) this.recent.splice(0, this.recent.length - RECENT_LIMIT);
    this.onEvents.fire(batch);
  }

  private dropClient(): void {
    this.stream?.cancel();
    this.stream = undefined;
    this.ctl?.close();
    this.ctl = undefined;
    this.info = undefined;
  }
}
