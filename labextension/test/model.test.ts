import { Signal } from '@lumino/signaling';
import { describe, expect, it } from 'vitest';

import { LoraModel } from '../src/model';
import { connectionMessage } from '../src/messages';
import { goodState } from './fixtures';

/* Just enough of Kernel.IComm / IKernelConnection / ISessionContext. */

class FakeComm {
  constructor(public targetName: string) {}
  opened: unknown[] = [];
  sent: unknown[] = [];
  closed = false;
  isDisposed = false;
  onMsg: (msg: unknown) => void = () => undefined;
  onClose: (msg: unknown) => void = () => undefined;
  failSend = false;
  open(data: unknown) {
    this.opened.push(data);
    return { done: Promise.resolve() };
  }
  send(data: unknown) {
    this.sent.push(data);
    return { done: this.failSend ? Promise.reject(new Error('socket closed')) : Promise.resolve() };
  }
  close() {
    this.closed = true;
    return { done: Promise.resolve() };
  }
  /** The kernel sends a message on this comm. */
  receive(data: unknown) {
    this.onMsg({ content: { comm_id: 'c', data } });
  }
}

class FakeKernel {
  status = 'idle';
  comms: FakeComm[] = [];
  createComm(target: string) {
    const comm = new FakeComm(target);
    this.comms.push(comm);
    return comm;
  }
  get last(): FakeComm {
    return this.comms[this.comms.length - 1];
  }
}

class FakeContext {
  path = 'work/quickstart.ipynb';
  name = 'quickstart.ipynb';
  isReady = true;
  hasNoKernel = false;
  session: { kernel: FakeKernel | null } | null;
  kernelChanged = new Signal<this, unknown>(this);
  statusChanged = new Signal<this, string>(this);
  iopubMessage = new Signal<this, unknown>(this);
  disposed = new Signal<this, void>(this);
  constructor(kernel: FakeKernel | null) {
    this.session = { kernel };
  }
  setStatus(status: string) {
    if (this.session?.kernel) {
      this.session.kernel.status = status;
    }
    this.statusChanged.emit(status);
  }
  execute() {
    this.iopubMessage.emit({ header: { msg_type: 'execute_input' } });
    this.setStatus('busy');
    this.setStatus('idle');
  }
}

function follow(ctx: FakeContext | null): LoraModel {
  const model = new LoraModel();
  model.setSessionContext(ctx as never);
  return model;
}

const flush = () => new Promise(resolve => setTimeout(resolve, 0));

describe('LoraModel', () => {
  it('says so when there is no notebook or no kernel', () => {
    expect(follow(null).connection.kind).toBe('no-notebook');
    expect(follow(new FakeContext(null)).connection.kind).toBe('no-kernel');
  });

  it('opens a comm to the ipylora target and shows the validated state', () => {
    const kernel = new FakeKernel();
    const model = follow(new FakeContext(kernel));
    expect(kernel.last.targetName).toBe('ipylora');
    expect(kernel.last.opened).toEqual([{ type: 'refresh' }]);
    expect(model.connection.kind).toBe('connecting');
    kernel.last.receive({ type: 'state', state: goodState() });
    expect(model.connection.kind).toBe('ready');
    expect(model.canStop).toBe(true);
    expect(model.label).toBe('quickstart.ipynb');
  });

  it('shows "not loaded" when the kernel closes the comm, and retries after an execution', () => {
    const kernel = new FakeKernel();
    const ctx = new FakeContext(kernel);
    const model = follow(ctx);
    kernel.last.onClose({});
    expect(model.connection).toEqual({ kind: 'not-loaded', restarted: false });
    expect(connectionMessage(model.connection)).toContain('run %load_ext ipylora');

    // Status chatter without an execution (e.g. our own comm_open) does not retry.
    ctx.setStatus('busy');
    ctx.setStatus('idle');
    expect(kernel.comms).toHaveLength(1);

    ctx.execute(); // the user ran a cell, maybe %load_ext ipylora
    expect(kernel.comms).toHaveLength(2);
    expect(model.connection.kind).toBe('not-loaded'); // no flicker while it asks
    kernel.last.receive({ type: 'state', state: goodState() });
    expect(model.connection.kind).toBe('ready');
  });

  it('reports a dead kernel, and a restarted one without ipylora', () => {
    const kernel = new FakeKernel();
    const ctx = new FakeContext(kernel);
    const model = follow(ctx);
    kernel.last.receive({ type: 'state', state: goodState() });
    ctx.setStatus('dead');
    expect(model.connection.kind).toBe('dead');
    expect(connectionMessage(model.connection)).toContain('kernel is dead');

    ctx.setStatus('autorestarting');
    expect(model.connection.kind).toBe('connecting');
    ctx.setStatus('idle');
    expect(kernel.comms).toHaveLength(2);
    kernel.last.onClose({});
    expect(model.connection).toEqual({ kind: 'not-loaded', restarted: true });
    expect(connectionMessage(model.connection)).toMatch(/^The kernel restarted/);
  });

  it('follows a kernel change and ignores the old comm', () => {
    const first = new FakeKernel();
    const ctx = new FakeContext(first);
    const model = follow(ctx);
    const oldComm = first.last;
    oldComm.receive({ type: 'state', state: goodState() });
    const second = new FakeKernel();
    ctx.session = { kernel: second };
    ctx.kernelChanged.emit({});
    expect(oldComm.closed).toBe(true);
    oldComm.receive({ type: 'state', state: goodState() });
    oldComm.onClose({});
    expect(model.connection.kind).toBe('connecting');
    second.last.receive({ type: 'state', state: goodState() });
    expect(model.connection.kind).toBe('ready');
  });

  it('does not close a comm the kernel has not answered yet (no "Comm not found")', () => {
    const kernel = new FakeKernel();
    const ctx = new FakeContext(kernel);
    const model = follow(ctx);
    const pending = kernel.last;
    model.setSessionContext(null); // the user switched away before the kernel answered
    expect(pending.closed).toBe(false);
    pending.onClose({}); // the kernel refuses it: nothing to do, nothing shown
    expect(model.connection.kind).toBe('no-notebook');

    // Had the target been registered, the first message closes the orphan.
    model.setSessionContext(ctx as never);
    const opened = kernel.last;
    model.setSessionContext(null);
    opened.receive({ type: 'state', state: goodState() });
    expect(opened.closed).toBe(true);
    expect(model.connection.kind).toBe('no-notebook');
  });

  it('sends stop and set_adapter, and shows kernel errors', () => {
    const kernel = new FakeKernel();
    const model = follow(new FakeContext(kernel));
    const comm = kernel.last;
    comm.receive({ type: 'state', state: goodState() });
    model.stop();
    model.setAdapter('sd-prompts'); // already active: nothing to send
    model.setAdapter('base');
    expect(comm.sent).toEqual([{ type: 'stop' }, { type: 'set_adapter', name: 'base' }]);
    comm.receive({ type: 'error', message: "No adapter named 'x'" });
    expect(model.error).toBe("No adapter named 'x'");
    expect(model.connection.kind).toBe('ready');
  });

  it('turns a malformed state into an error and keeps the last good one', () => {
    const kernel = new FakeKernel();
    const model = follow(new FakeContext(kernel));
    kernel.last.receive({ type: 'state', state: goodState() });
    kernel.last.receive({ type: 'state', state: { version: 1 } });
    expect(model.error).toContain('state.version must be a string');
    expect(model.connection.kind).toBe('ready');
  });

  it('reports a failed send instead of an unhandled rejection', async () => {
    const kernel = new FakeKernel();
    const model = follow(new FakeContext(kernel));
    kernel.last.receive({ type: 'state', state: goodState() });
    kernel.last.failSend = true;
    model.stop();
    await flush();
    expect(model.error).toContain('socket closed');
  });

  it('refuses to send when not connected', () => {
    const kernel = new FakeKernel();
    const model = follow(new FakeContext(kernel));
    kernel.last.onClose({});
    model.stop();
    expect(model.error).toContain('not connected');
  });
});
