/**
 * A fake ControlService (@grpc/grpc-js Server on 127.0.0.1:0) for tests of the relay and
 * of the views the real supervisor cannot drive on demand yet (plan cards, health,
 * compare, exports). It checks the token like the real one, records every call, and
 * answers from plain state the test controls. The browser test of the real thing is
 * dashboard.e2e.test.ts; this fake never stands in for it.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { TOKEN_METADATA_KEY, controlServiceDefinition, findProto } from '../src/client';
import type { PEvent, PPlanCard, PRunInfo } from '../src/protoTypes';

export const FAKE_TOKEN = 'secret-token';

type Handler = (req: Record<string, unknown>) => unknown;

export interface FakeOptions {
  sessionId: string;
  events?: PEvent[];
  runs?: Partial<PRunInfo>[];
  plans?: PPlanCard[];
  /** Per-method answers; a method with none answers UNIMPLEMENTED, like an unbuilt RPC. */
  handlers?: Record<string, Handler>;
}

export function fakeEvent(seq: number, kind = 'log', payload: Record<string, unknown> = { level: 'info', text: `event ${seq}` }, runId = 'main'): PEvent {
  return { seq, time: 1_700_000_000 + seq, kind, run_id: runId, payload_json: JSON.stringify(payload) };
}

/** Throw this from a handler to answer with a gRPC status. */
export function grpcError(code: grpc.status, details: string): Error {
  return Object.assign(new Error(details), { code, details });
}

export class FakeSupervisor {
  readonly events: PEvent[];
  readonly watchFromSeqs: number[] = [];
  readonly calls: { method: string; request: Record<string, unknown> }[] = [];
  readonly tokensSeen: string[] = [];
  readonly streams = new Set<grpc.ServerWritableStream<unknown, unknown>>();
  runs: Partial<PRunInfo>[];
  plans: PPlanCard[];
  automode = false;
  readonly handlers: Record<string, Handler>;
  server!: grpc.Server;
  port = 0;

  constructor(readonly opts: FakeOptions) {
    this.events = opts.events ?? [];
    this.runs = opts.runs ?? [];
    this.plans = opts.plans ?? [];
    this.handlers = opts.handlers ?? {};
  }

  get sessionId(): string {
    return this.opts.sessionId;
  }

  async start(): Promise<this> {
    const server = new grpc.Server();
    const authed = (md: grpc.Metadata): boolean => {
      const t = String(md.get(TOKEN_METADATA_KEY)[0] ?? '');
      this.tokensSeen.push(t);
      return t === FAKE_TOKEN;
    };
    const impl: grpc.UntypedServiceImplementation = {};
    const def = controlServiceDefinition(findProto());
    for (const [name, m] of Object.entries(def)) {
      if (m.responseStream) continue;
      impl[name] = (call: grpc.ServerUnaryCall<Record<string, unknown>, unknown>, cb: grpc.sendUnaryData<unknown>) => {
        if (!authed(call.metadata)) return cb(grpcError(grpc.status.UNAUTHENTICATED, 'missing or wrong session token (see connection.json)'));
        this.calls.push({ method: name, request: call.request });
        const h = this.handlers[name] ?? this.builtin(name);
        if (!h) return cb(grpcError(grpc.status.UNIMPLEMENTED, `${name} is not built yet in this version of OnTheFly`));
        try {
          cb(null, h(call.request));
        } catch (e) {
          cb(e as grpc.ServiceError);
        }
      };
    }
    impl.WatchEvents = (call: grpc.ServerWritableStream<{ from_seq: number; client: string }, unknown>) => {
      if (!authed(call.metadata)) {
        call.destroy(grpcError(grpc.status.UNAUTHENTICATED, 'missing or wrong session token'));
        return;
      }
      this.watchFromSeqs.push(Number(call.request.from_seq));
      for (const e of this.events) if (e.seq > Number(call.request.from_seq)) call.write(e);
      this.streams.add(call as grpc.ServerWritableStream<unknown, unknown>);
      call.on('cancelled', () => this.streams.delete(call as grpc.ServerWritableStream<unknown, unknown>));
    };
    server.addService(def, impl);
    this.port = await new Promise<number>((resolve, reject) =>
      server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
    this.server = server;
    return this;
  }

  /** Publishes an event to every open WatchEvents stream (and to later replays). */
  publish(kind: string, payload: Record<string, unknown>, runId = 'main'): PEvent {
    const e = fakeEvent((this.events.at(-1)?.seq ?? 0) + 1, kind, payload, runId);
    this.events.push(e);
    for (const s of this.streams) s.write(e);
    return e;
  }

  lastCall(method: string): Record<string, unknown> | undefined {
    return [...this.calls].reverse().find((c) => c.method === method)?.request;
  }

  writeConnection(file: string, token = FAKE_TOKEN, pid = process.pid): void {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    const tmp = `${file}.tmp`;
    fs.writeFileSync(tmp, JSON.stringify({ host: '127.0.0.1', port: this.port, token, session_id: this.sessionId, pid }));
    fs.renameSync(tmp, file);
  }

  stop(): void {
    this.server?.forceShutdown();
  }

  private builtin(name: string): Handler | undefined {
    const runInfo = (r: Partial<PRunInfo>): Partial<PRunInfo> => ({ status: 'RUN_STATUS_RUNNING', kind: 'main', parents: [], val_loss: NaN, test_loss: NaN, ...r });
    switch (name) {
      case 'GetStatus':
        return () => ({
          session_id: this.sessionId,
          session_dir: '/tmp/fake-session',
          script: '/tmp/train.py',
          argv: [],
          started: 1,
          automode: this.automode,
          workers: [],
          runs: this.runs.map(runInfo),
          gpus: [],
          last_event_seq: this.events.at(-1)?.seq ?? 0,
          state: 'running',
          port: this.port,
        });
      case 'ListRuns':
        return () => ({ runs: this.runs.map(runInfo) });
      case 'ListPlans':
        return () => ({ plans: this.plans });
      case 'SetAutomode':
        return (r) => {
          this.automode = !!r.enabled;
          return { ok: true, message: `automode ${this.automode ? 'on' : 'off'}` };
        };
      default:
        return undefined;
    }
  }
}
