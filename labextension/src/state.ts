/**
 * The shape of what the kernel sends over the `ipylora` comm, and a strict
 * parser for it.
 *
 * The kernel is trusted code, but it is a different program with its own
 * version: a field renamed there must show up as one readable error in the
 * sidebar, not as `undefined` rendered in a table or a crash in the view.
 * So every message goes through `parseKernelMessage` before the view sees it.
 */

export interface IModelInfo {
  id: string;
  dtype: string;
  quantization: string | null;
  device: string;
  memory: string;
}

export interface IDatasetInfo {
  name: string;
  rows: number;
}

export interface IAdapterInfo {
  name: string;
  active: boolean;
}

export type RunStatus = 'running' | 'finished' | 'stopped' | 'failed';

export interface IRunInfo {
  name: string;
  status: RunStatus;
  step: number;
  total: number;
  /** Recent losses; `null` where the kernel had a non-finite value. */
  loss: Array<number | null>;
  tokens_per_s: number;
  eta_s: number | null;
}

export interface ISessionState {
  version: string;
  model: IModelInfo | null;
  datasets: IDatasetInfo[];
  adapters: IAdapterInfo[];
  run: IRunInfo | null;
}

export type KernelMessage =
  | { type: 'state'; state: ISessionState }
  | { type: 'error'; message: string };

/** Messages the frontend sends; mirrored by the validation in `ipylora/lab/comm.py`. */
export type FrontendMessage =
  | { type: 'refresh' }
  | { type: 'stop' }
  | { type: 'set_adapter'; name: string };

/** Raised by the parser; its message names the offending field. */
export class StateError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'StateError';
  }
}

const RUN_STATUSES: ReadonlyArray<string> = ['running', 'finished', 'stopped', 'failed'];

type Json = unknown;

function isRecord(value: Json): value is Record<string, Json> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function field(obj: Record<string, Json>, key: string, where: string): Json {
  if (!(key in obj)) {
    throw new StateError(`${where}.${key} is missing`);
  }
  return obj[key];
}

function str(obj: Record<string, Json>, key: string, where: string): string {
  const value = field(obj, key, where);
  if (typeof value !== 'string') {
    throw new StateError(`${where}.${key} must be a string, got ${describe(value)}`);
  }
  return value;
}

function optStr(obj: Record<string, Json>, key: string, where: string): string | null {
  const value = obj[key] ?? null;
  if (value !== null && typeof value !== 'string') {
    throw new StateError(`${where}.${key} must be a string or null, got ${describe(value)}`);
  }
  return value;
}

function num(obj: Record<string, Json>, key: string, where: string): number {
  const value = field(obj, key, where);
  if (typeof value !== 'number' || !Number.isFinite(value)) {
    throw new StateError(`${where}.${key} must be a finite number, got ${describe(value)}`);
  }
  return value;
}

function optNum(obj: Record<string, Json>, key: string, where: string): number | null {
  const value = obj[key] ?? null;
  if (value === null) {
    return null;
  }
  if (typeof value !== 'number' || !Number.isFinite(value)) {
    throw new StateError(`${where}.${key} must be a number or null, got ${describe(value)}`);
  }
  return value;
}

function bool(obj: Record<string, Json>, key: string, where: string): boolean {
  const value = field(obj, key, where);
  if (typeof value !== 'boolean') {
    throw new StateError(`${where}.${key} must be true or false, got ${describe(value)}`);
  }
  return value;
}

function list<T>(
  obj: Record<string, Json>,
  key: string,
  where: string,
  item: (value: Json, where: string) => T
): T[] {
  const value = field(obj, key, where);
  if (!Array.isArray(value)) {
    throw new StateError(`${where}.${key} must be a list, got ${describe(value)}`);
  }
  return value.map((v, i) => item(v, `${where}.${key}[${i}]`));
}

function record(value: Json, where: string): Record<string, Json> {
  if (!isRecord(value)) {
    throw new StateError(`${where} must be an object, got ${describe(value)}`);
  }
  return value;
}

function describe(value: Json): string {
  if (value === null) {
    return 'null';
  }
  if (Array.isArray(value)) {
    return 'a list';
  }
  if (typeof value === 'string') {
    return JSON.stringify(value.length > 40 ? value.slice(0, 40) + '…' : value);
  }
  return typeof value === 'object' ? 'an object' : String(value);
}

function parseModel(value: Json, where: string): IModelInfo | null {
  if (value === null || value === undefined) {
    return null;
  }
  const obj = record(value, where);
  return {
    id: str(obj, 'id', where),
    dtype: str(obj, 'dtype', where),
    quantization: optStr(obj, 'quantization', where),
    device: str(obj, 'device', where),
    memory: str(obj, 'memory', where)
  };
}

function parseDataset(value: Json, where: string): IDatasetInfo {
  const obj = record(value, where);
  return { name: str(obj, 'name', where), rows: num(obj, 'rows', where) };
}

function parseAdapter(value: Json, where: string): IAdapterInfo {
  const obj = record(value, where);
  return { name: str(obj, 'name', where), active: bool(obj, 'active', where) };
}

function parseLossPoint(value: Json, where: string): number | null {
  if (value === null) {
    return null;
  }
  if (typeof value !== 'number') {
    throw new StateError(`${where} must be a number or null, got ${describe(value)}`);
  }
  return Number.isFinite(value) ? value : null;
}

function parseRun(value: Json, where: string): IRunInfo | null {
  if (value === null || value === undefined) {
    return null;
  }
  const obj = record(value, where);
  const status = str(obj, 'status', where);
  if (!RUN_STATUSES.includes(status)) {
    throw new StateError(
      `${where}.status must be one of ${RUN_STATUSES.join(', ')}, got ${describe(status)}`
    );
  }
  return {
    name: str(obj, 'name', where),
    status: status as RunStatus,
    step: num(obj, 'step', where),
    total: num(obj, 'total', where),
    loss: list(obj, 'loss', where, parseLossPoint),
    tokens_per_s: num(obj, 'tokens_per_s', where),
    eta_s: optNum(obj, 'eta_s', where)
  };
}

/** Validate a session snapshot (the `state` field of a state message). */
export function parseState(value: Json): ISessionState {
  const where = 'state';
  const obj = record(value, where);
  return {
    version: str(obj, 'version', where),
    model: parseModel(obj['model'], `${where}.model`),
    datasets: list(obj, 'datasets', where, parseDataset),
    adapters: list(obj, 'adapters', where, parseAdapter),
    run: parseRun(obj['run'], `${where}.run`)
  };
}

/** Validate one message from the kernel; throws `StateError` naming the bad field. */
export function parseKernelMessage(value: Json): KernelMessage {
  const obj = record(value, 'message');
  const type = str(obj, 'type', 'message');
  if (type === 'state') {
    return { type, state: parseState(field(obj, 'state', 'message')) };
  }
  if (type === 'error') {
    return { type, message: str(obj, 'message', 'message') };
  }
  throw new StateError(`message.type ${describe(type)} is not one of state, error`);
}

/** "1h 02m", "3m 05s", "42s": short enough for a sidebar row. */
export function formatDuration(seconds: number | null): string {
  if (seconds === null || !Number.isFinite(seconds) || seconds < 0) {
    return '—';
  }
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  const pad = (n: number): string => n.toString().padStart(2, '0');
  if (h > 0) {
    return `${h}h ${pad(m)}m`;
  }
  if (m > 0) {
    return `${m}m ${pad(sec)}s`;
  }
  return `${sec}s`;
}

/** The adapter currently in use, or "base" when none is active. */
export function activeAdapter(state: ISessionState): string {
  const active = state.adapters.find(a => a.active);
  return active ? active.name : 'base';
}
