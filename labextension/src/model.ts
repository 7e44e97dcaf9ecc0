/**
 * Kernel traffic for the LoRA sidebar: one comm to the `ipylora` target of
 * the active notebook's kernel.
 *
 * The model follows a session context (the notebook's), opens the comm when
 * the kernel is up, and turns everything that can happen to that kernel into
 * one `ConnectionState` the view renders as is: no notebook, no kernel, a
 * kernel without ipylora (the kernel closes a comm whose target it does not
 * know), a dead kernel, or a live state. When ipylora is not loaded it tries
 * again after the next cell execution, so `%load_ext ipylora` lights the
 * sidebar up without a click. Every message from the kernel is validated by
 * `parseKernelMessage` first.
 */

import type { ISessionContext } from '@jupyterlab/apputils';
import type { Kernel, KernelMessage } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

import {
  FrontendMessage,
  ISessionState,
  StateError,
  activeAdapter,
  parseKernelMessage
} from './state';

export const COMM_TARGET = 'ipylora';

export type ConnectionState =
  | { kind: 'no-notebook' }
  | { kind: 'no-kernel' }
  | { kind: 'connecting' }
  | { kind: 'dead' }
  | { kind: 'not-loaded'; restarted: boolean }
  | { kind: 'ready'; state: ISessionState };

export class LoraModel {
  /** Emitted whenever `connection` or `error` changes. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get connection(): ConnectionState {
    return this._connection;
  }

  /** The last error from the kernel or from a bad message; cleared on the next action. */
  get error(): string | null {
    return this._error;
  }

  /** Name of the notebook being followed, for the sidebar header. */
  get label(): string {
    const ctx = this._context;
    if (!ctx) {
      return '';
    }
    const path = ctx.path || ctx.name || '';
    return path.split('/').pop() ?? path;
  }

  get canStop(): boolean {
    const c = this._connection;
    return c.kind === 'ready' && c.state.run !== null && c.state.run.status === 'running';
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  /** Follow another notebook's session context (or none). */
  setSessionContext(context: ISessionContext | null): void {
    if (context === this._context) {
      return;
    }
    if (this._context) {
      this._context.kernelChanged.disconnect(this._onKernelChanged, this);
      this._context.statusChanged.disconnect(this._onStatus, this);
      this._context.iopubMessage.disconnect(this._onIOPub, this);
      this._context.disposed.disconnect(this._onContextDisposed, this);
    }
    this._dropComm();
    this._context = context;
    this._restarted = false;
    if (context) {
      context.kernelChanged.connect(this._onKernelChanged, this);
      context.statusChanged.connect(this._onStatus, this);
      context.iopubMessage.connect(this._onIOPub, this);
      context.disposed.connect(this._onContextDisposed, this);
    }
    this._connect();
  }

  refresh(): void {
    if (this._connection.kind === 'ready') {
      this._send({ type: 'refresh' });
    } else {
      this._connect();
    }
  }

  stop(): void {
    this._send({ type: 'stop' });
  }

  setAdapter(name: string): void {
    const c = this._connection;
    if (c.kind === 'ready' && activeAdapter(c.state) === name) {
      return;
    }
    this._send({ type: 'set_adapter', name });
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this.setSessionContext(null);
    this._disposed = true;
    Signal.clearData(this);
  }

  /** `retry`: ipylora was not loaded; keep saying so until the kernel answers. */
  private _connect(retry = false): void {
    this._dropComm();
    const ctx = this._context;
    if (!ctx) {
      this._setConnection({ kind: 'no-notebook' });
      return;
    }
    const kernel = ctx.session?.kernel ?? null;
    if (!kernel) {
      this._setConnection(
        ctx.isReady || ctx.hasNoKernel ? { kind: 'no-kernel' } : { kind: 'connecting' }
      );
      return;
    }
    const status = kernel.status;
    if (status === 'dead') {
      this._setConnection({ kind: 'dead' });
      return;
    }
    if (status !== 'idle' && status !== 'busy') {
      // Starting or restarting: `_onStatus` calls back here once it is idle.
      this._setConnection({ kind: 'connecting' });
      return;
    }
    this._open(kernel, retry);
  }

  private _open(kernel: Kernel.IKernelConnection, retry: boolean): void {
    let comm: Kernel.IComm;
    try {
      comm = kernel.createComm(COMM_TARGET);
    } catch (reason) {
      this._setError(`Could not open the ipylora channel: ${String(reason)}`);
      return;
    }
    this._comm = comm;
    this._executedSinceClose = false;
    if (!retry) {
      // Never show one kernel's state while connecting to another.
      this._setConnection({ kind: 'connecting' });
    }
    comm.onMsg = (msg: KernelMessage.ICommMsgMsg) => {
      this._confirmed.add(comm);
      if (comm === this._comm) {
        this._onCommMsg(msg.content.data);
      }
    };
    comm.onClose = () => {
      if (comm !== this._comm) {
        return;
      }
      // The kernel closes a comm whose target is not registered: ipylora is
      // not loaded there (or it was unloaded).
      this._comm = null;
      this._setConnection({ kind: 'not-loaded', restarted: this._restarted });
    };
    const request: FrontendMessage = { type: 'refresh' };
    try {
      comm.open(request as unknown as KernelMessage.ICommOpenMsg['content']['data'])
        .done.catch((reason: unknown) => this._onSendFailed(comm, reason));
    } catch (reason) {
      this._onSendFailed(comm, reason);
    }
  }

  private _send(message: FrontendMessage): void {
    const comm = this._comm;
    if (!comm || this._connection.kind !== 'ready') {
      this._setError('ipylora is not connected to this kernel.');
      return;
    }
    this._setError(null);
    try {
      comm
        .send(message as unknown as KernelMessage.ICommMsgMsg['content']['data'])
        .done.catch((reason: unknown) => this._onSendFailed(comm, reason));
    } catch (reason) {
      this._onSendFailed(comm, reason);
    }
  }

  private _onSendFailed(comm: Kernel.IComm, reason: unknown): void {
    if (comm !== this._comm) {
      return; // a comm we already dropped: its failure is expected
    }
    const text = reason instanceof Error ? reason.message : String(reason);
    this._setError(`Message to the kernel failed: ${text}`);
  }

  private _onCommMsg(data: unknown): void {
    let message;
    try {
      message = parseKernelMessage(data);
    } catch (reason) {
      const text = reason instanceof StateError ? reason.message : String(reason);
      this._setError(`Unexpected message from the kernel (${text}). Are ipylora and the extension the same version?`);
      return;
    }
    if (message.type === 'error') {
      this._setError(message.message);
      return;
    }
    this._restarted = false;
    this._setConnection({ kind: 'ready', state: message.state });
  }

  private _onKernelChanged(): void {
    this._restarted = false;
    this._connect();
  }

  private _onStatus(_: ISessionContext, status: Kernel.Status): void {
    if (status === 'dead') {
      this._dropComm();
      this._setConnection({ kind: 'dead' });
      return;
    }
    if (status === 'restarting' || status === 'autorestarting' || status === 'starting') {
      this._dropComm();
      this._restarted = this._restarted || status !== 'starting';
      this._setConnection({ kind: 'connecting' });
      return;
    }
    if (status !== 'idle') {
      return;
    }
    const kind = this._connection.kind;
    if (kind === 'connecting' && this._comm === null) {
      this._connect();
    } else if ((kind === 'not-loaded' || kind === 'dead') && this._executedSinceClose) {
      // Something ran since the kernel refused the comm: maybe `%load_ext ipylora`.
      this._connect(kind === 'not-loaded');
    }
  }

  private _onIOPub(_: ISessionContext, msg: KernelMessage.IMessage): void {
    if (msg.header.msg_type === 'execute_input') {
      this._executedSinceClose = true;
    }
  }

  private _onContextDisposed(): void {
    this.setSessionContext(null);
  }

  private _dropComm(): void {
    const comm = this._comm;
    this._comm = null;
    if (!comm || comm.isDisposed) {
      return;
    }
    if (this._confirmed.has(comm)) {
      closeQuietly(comm);
      return;
    }
    // The kernel has not answered the open yet. Closing now would make its
    // answer (a close, when ipylora is not loaded) arrive for a comm the page
    // no longer knows: JupyterLab logs "Comm not found" as a console error.
    // Wait for the answer instead and close only a comm that did open.
    comm.onClose = () => undefined;
    comm.onMsg = () => closeQuietly(comm);
  }

  private _setConnection(connection: ConnectionState): void {
    this._connection = connection;
    this._changed.emit();
  }

  private _setError(error: string | null): void {
    if (error === this._error) {
      return;
    }
    this._error = error;
    this._changed.emit();
  }

  /** Comms the kernel has answered on, i.e. that really are open. */
  private _confirmed = new WeakSet<Kernel.IComm>();
  private _context: ISessionContext | null = null;
  private _comm: Kernel.IComm | null = null;
  private _connection: ConnectionState = { kind: 'no-notebook' };
  private _error: string | null = null;
  private _restarted = false;
  private _executedSinceClose = false;
  private _disposed = false;
  private _changed = new Signal<this, void>(this);
}

function closeQuietly(comm: Kernel.IComm): void {
  if (comm.isDisposed) {
    return;
  }
  try {
    comm.close().done.catch(() => {
      /* the kernel may be gone; nothing to close */
    });
  } catch {
    /* the kernel connection is already disposed */
  }
}
