/**
 * The gRPC client for one supervisor: ControlService over @grpc/grpc-js, the contract
 * loaded at run time from the .proto the build copied next to the bundle. Every call
 * carries the session token (`x-onthefly-token`) and a deadline. No vscode import, so
 * the relay and the browser end-to-end test use the very same code in plain node.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import type { RpcErrorDto } from '../shared/protocol';
import type { PEvent, UnaryRpcName, UnaryRpcs } from './protoTypes';

/** `<session>/connection.json`, as the supervisor writes it (0600). */
export interface ConnectionInfo {
  host: string;
  port: number;
  token: string;
  session_id: string;
  pid: number;
  /** Absolute session folder, when the supervisor writes it. */
  session_dir?: string;
}

export const TOKEN_METADATA_KEY = 'x-onthefly-token';

/** Parses and checks connection.json; throws an Error that names the bad field. */
export function parseConnectionInfo(text: string, file = 'connection.json'): ConnectionInfo {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new Error(`${file} is not JSON: ${(e as Error).message}`);
  }
  if (typeof raw !== 'object' || raw === null) throw new Error(`${file} must hold a JSON object`);
  const o = raw as Record<string, unknown>;
  const host = typeof o.host === 'string' && o.host ? o.host : '127.0.0.1';
  const port = typeof o.port === 'number' ? o.port : Number(o.port);
  if (!Number.isInteger(port) || port <= 0 || port > 65535) throw new Error(`${file}: "port" must be a TCP port, got ${JSON.stringify(o.port)}`);
  if (typeof o.token !== 'string') throw new Error(`${file}: "token" is missing`);
  const info: ConnectionInfo = {
    host,
    port,
    token: o.token,
    session_id: typeof o.session_id === 'string' ? o.session_id : '',
    pid: typeof o.pid === 'number' ? o.pid : 0,
  };
  if (typeof o.session_dir === 'string') info.session_dir = o.session_dir;
  return info;
}

/** A failed RPC (or a failure to reach the supervisor), with the gRPC status. */
export class RpcError extends Error {
  override name = 'RpcError';
  constructor(
    readonly code: number,
    readonly codeName: string,
    readonly details: string,
  ) {
    super(`${codeName}: ${details}`);
  }

  toDto(): RpcErrorDto {
    return { code: this.code, codeName: this.codeName, message: this.details };
  }

  static from(err: unknown): RpcError {
    if (err instanceof RpcError) return err;
    const e = err as Partial<grpc.ServiceError> | undefined;
    if (e && typeof e.code === 'number') {
      const codeName = grpc.status[e.code] ?? `CODE_${e.code}`;
      return new RpcError(e.code, codeName, e.details || e.message || codeName);
    }
    return new RpcError(-1, 'INTERNAL', err instanceof Error ? err.message : String(err));
  }
}

/** Candidate locations of the .proto: next to the bundle (dist/proto), then the source tree. */
export function findProto(extra: string[] = []): string {
  const candidates = [
    ...extra,
    path.join(__dirname, 'proto', 'onthefly.proto'),
    path.join(__dirname, '..', 'dist', 'proto', 'onthefly.proto'),
    path.join(__dirname, '..', '..', 'dist', 'proto', 'onthefly.proto'),
    path.join(__dirname, '..', '..', '..', 'dist', 'proto', 'onthefly.proto'),
    path.join(__dirname, '..', '..', 'proto', 'onthefly_proto', 'onthefly.proto'),
  ];
  for (const c of candidates) if (fs.existsSync(c)) return c;
  throw new Error(`onthefly.proto not found (looked in ${candidates.join(', ')}); run "npm run build"`);
}

type ServiceCtor = new (address: string, creds: grpc.ChannelCredentials, options?: grpc.ChannelOptions) => grpc.Client;

const definitionCache = new Map<string, grpc.GrpcObject>();

/** Loads the onthefly.v1 package from a .proto file (cached per path). */
export function loadPackage(protoPath: string): grpc.GrpcObject {
  let pkg = definitionCache.get(protoPath);
  if (!pkg) {
    const def = protoLoader.loadSync(protoPath, {
      keepCase: true,
      longs: Number,
      enums: String,
      defaults: true,
      arrays: true,
      objects: false,
      oneofs: true,
    });
    pkg = grpc.loadPackageDefinition(def);
    definitionCache.set(protoPath, pkg);
  }
  return pkg;
}

function service(protoPath: string, name: 'ControlService' | 'WorkerService'): ServiceCtor {
  const pkg = loadPackage(protoPath) as unknown as { onthefly: { v1: Record<string, ServiceCtor> } };
  const ctor = pkg.onthefly?.v1?.[name];
  if (!ctor) throw new Error(`${protoPath} has no onthefly.v1.${name}`);
  return ctor;
}

/** The ServiceDefinition of ControlService (the fake-server tests implement it). */
export function controlServiceDefinition(protoPath: string): grpc.ServiceDefinition {
  return (service(protoPath, 'ControlService') as unknown as { service: grpc.ServiceDefinition }).service;
}

export interface CallOptions {
  /** Deadline in milliseconds from now. */
  timeoutMs?: number;
}

export interface EventStream {
  cancel(): void;
}

export interface EventStreamHandlers {
  onEvent(e: PEvent): void;
  /** Called once, when the stream ends (error undefined when the server closed it cleanly). */
  onEnd(error: RpcError | undefined): void;
}

/** ControlService calls with the token and deadlines; one channel per supervisor. */
export class ControlClient {
  private readonly client: grpc.Client;
  private closed = false;

  constructor(
    readonly info: ConnectionInfo,
    protoPath: string,
    private readonly defaultTimeoutMs = 15_000,
  ) {
    const Ctor = service(protoPath, 'ControlService');
    this.client = new Ctor(`${info.host}:${info.port}`, grpc.credentials.createInsecure(), {
      // A dashboard reconnects itself (session.ts); do not let a channel sit in backoff for minutes.
      'grpc.initial_reconnect_backoff_ms': 200,
      'grpc.max_reconnect_backoff_ms': 2000,
      'grpc.max_receive_message_length': 64 * 1024 * 1024,
      'grpc.enable_retries': 0,
    });
  }

  get address(): string {
    return `${this.info.host}:${this.info.port}`;
  }

  private metadata(): grpc.Metadata {
    const md = new grpc.Metadata();
    md.set(TOKEN_METADATA_KEY, this.info.token);
    return md;
  }

  call<M extends UnaryRpcName>(method: M, request: UnaryRpcs[M][0], opts: CallOptions = {}): Promise<UnaryRpcs[M][1]> {
    if (this.closed) return Promise.reject(new RpcError(grpc.status.CANCELLED, 'CANCELLED', 'the connection was closed'));
    const fn = (this.client as unknown as Record<string, unknown>)[method];
    if (typeof fn !== 'function') {
      return Promise.reject(new RpcError(grpc.status.UNIMPLEMENTED, 'UNIMPLEMENTED', `${method} is not in onthefly.proto`));
    }
    const deadline = new Date(Date.now() + (opts.timeoutMs ?? this.defaultTimeoutMs));
    return new Promise((resolve, reject) => {
      (fn as (...args: unknown[]) => void).call(
        this.client,
        request,
        this.metadata(),
        { deadline },
        (err: grpc.ServiceError | null, reply: UnaryRpcs[M][1]) => {
          if (err) reject(RpcError.from(err));
          else resolve(reply);
        },
      );
    });
  }

  /** ControlService.WatchEvents from `fromSeq` (exclusive), as client "dashboard". */
  watchEvents(fromSeq: number, handlers: EventStreamHandlers, client = 'dashboard'): EventStream {
    const call = (this.client as unknown as { WatchEvents: (req: unknown, md: grpc.Metadata) => grpc.ClientReadableStream<PEvent> }).WatchEvents(
      { from_seq: fromSeq, kinds: [], client },
      this.metadata(),
    );
    let ended = false;
    let cancelled = false;
    const end = (err: RpcError | undefined): void => {
      if (ended) return;
      ended = true;
      handlers.onEnd(err);
    };
    call.on('data', (e: PEvent) => {
      if (!ended) handlers.onEvent(e);
    });
    call.on('error', (err: unknown) => end(cancelled ? undefined : RpcError.from(err)));
    call.on('end', () => end(undefined));
    return {
      cancel: () => {
        cancelled = true;
        call.cancel();
      },
    };
  }

  close(): void {
    this.closed = true;
    this.client.close();
  }
}
