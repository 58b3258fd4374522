/** Request/reply over postMessage: the webview's only way to reach the supervisor. */
import {
  type HostToWebview,
  MessageType,
  type MethodName,
  type ParamsOf,
  type ResultOf,
  type RpcErrorDto,
  type WebviewToHost,
  describeError,
  makeRequest,
} from '../shared/protocol';

export interface VsCodeApi {
  postMessage(msg: WebviewToHost): void;
  getState(): unknown;
  setState(state: unknown): void;
}

declare function acquireVsCodeApi(): VsCodeApi;

export function vscodeApi(): VsCodeApi {
  if (typeof acquireVsCodeApi === 'function') return acquireVsCodeApi();
  // Opened outside VS Code (a plain browser): a harmless stand-in so the page still renders.
  let state: unknown;
  return {
    postMessage: (m) => console.warn('[onthefly] no host for', m),
    getState: () => state,
    setState: (s) => {
      state = s;
    },
  };
}

/** A failed request: the method and the gRPC error as the host reported it. */
export class RpcFailure extends Error {
  constructor(
    readonly method: MethodName,
    readonly error: RpcErrorDto,
  ) {
    super(describeError(method, error));
  }
}

interface Pending {
  method: MethodName;
  resolve(v: unknown): void;
  reject(e: unknown): void;
  timer: number;
}

export class HostRpc {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();

  constructor(private readonly api: VsCodeApi) {}

  /** Calls a method; rejects with RpcFailure on an RPC error or when the host does not answer in time. */
  call<M extends MethodName>(method: M, params: ParamsOf<M>, timeoutMs = 120_000): Promise<ResultOf<M>> {
    const id = this.nextId++;
    return new Promise<ResultOf<M>>((resolve, reject) => {
      const timer = window.setTimeout(() => {
        this.pending.delete(id);
        reject(new RpcFailure(method, { code: 4, codeName: 'DEADLINE_EXCEEDED', message: `no answer from the extension host after ${Math.round(timeoutMs / 1000)} s` }));
      }, timeoutMs);
      this.pending.set(id, { method, resolve: resolve as (v: unknown) => void, reject, timer });
      this.api.postMessage(makeRequest(id, method, params));
    });
  }

  /** Feeds a host message; returns true when it was a response this object handled. */
  handle(msg: HostToWebview): boolean {
    if (msg.type !== MessageType.Response) return false;
    const p = this.pending.get(msg.id);
    if (!p) return true;
    this.pending.delete(msg.id);
    window.clearTimeout(p.timer);
    if (msg.ok) p.resolve(msg.result);
    else p.reject(new RpcFailure(p.method, msg.error));
    return true;
  }

  /** Fails every call still waiting (e.g. the session changed under them). */
  failAll(reason: string): void {
    for (const [id, p] of this.pending) {
      window.clearTimeout(p.timer);
      p.reject(new RpcFailure(p.method, { code: 1, codeName: 'CANCELLED', message: reason }));
      this.pending.delete(id);
    }
  }
}
