import { describe, expect, it } from 'vitest';

import {
  StateError,
  activeAdapter,
  formatDuration,
  parseKernelMessage,
  parseState
} from '../src/state';
import { goodState } from './fixtures';

describe('parseState', () => {
  it('accepts the contract snapshot as is', () => {
    const state = parseState(goodState());
    expect(state.model?.quantization).toBe('nf4');
    expect(state.run?.loss).toEqual([2.5, 1.9, null, 1.2]);
    expect(activeAdapter(state)).toBe('sd-prompts');
  });

  it('accepts an empty session', () => {
    const state = parseState({ version: '0', model: null, datasets: [], adapters: [], run: null });
    expect(state.model).toBeNull();
    expect(state.run).toBeNull();
    expect(activeAdapter(state)).toBe('base');
  });

  it('treats a missing quantization and eta as null', () => {
    const raw = goodState();
    delete (raw.model as Record<string, unknown>).quantization;
    (raw.run as Record<string, unknown>).eta_s = null;
    const state = parseState(raw);
    expect(state.model?.quantization).toBeNull();
    expect(state.run?.eta_s).toBeNull();
  });

  const cases: Array<[string, (s: any) => void, string]> = [
    ['missing version', s => delete s.version, 'state.version is missing'],
    ['model id number', s => (s.model.id = 3), 'state.model.id must be a string, got 3'],
    ['datasets not list', s => (s.datasets = {}), 'state.datasets must be a list, got an object'],
    ['rows string', s => (s.datasets[0].rows = '55'), 'state.datasets[0].rows must be a finite number'],
    ['active not bool', s => (s.adapters[1].active = 'no'), 'state.adapters[1].active must be true or false'],
    ['unknown status', s => (s.run.status = 'paused'), 'state.run.status must be one of'],
    ['loss string', s => (s.run.loss = [1, 'x']), 'state.run.loss[1] must be a number or null'],
    ['step NaN', s => (s.run.step = NaN), 'state.run.step must be a finite number'],
    ['run as list', s => (s.run = []), 'state.run must be an object, got a list']
  ];
  it.each(cases)('rejects %s with the field named', (_name, mutate, message) => {
    const raw = goodState();
    mutate(raw);
    expect(() => parseState(raw)).toThrow(StateError);
    expect(() => parseState(raw)).toThrow(message);
  });
});

describe('parseKernelMessage', () => {
  it('parses state and error messages', () => {
    const state = parseKernelMessage({ type: 'state', state: goodState() });
    expect(state.type).toBe('state');
    expect(parseKernelMessage({ type: 'error', message: 'No adapter named x' })).toEqual({
      type: 'error',
      message: 'No adapter named x'
    });
  });

  it('rejects unknown types and non-objects', () => {
    expect(() => parseKernelMessage({ type: 'hello' })).toThrow('is not one of state, error');
    expect(() => parseKernelMessage('state')).toThrow('message must be an object');
    expect(() => parseKernelMessage({ type: 'error' })).toThrow('message.message is missing');
  });
});

describe('formatDuration', () => {
  it('formats short and long durations', () => {
    expect(formatDuration(42)).toBe('42s');
    expect(formatDuration(185)).toBe('3m 05s');
    expect(formatDuration(3720)).toBe('1h 02m');
    expect(formatDuration(null)).toBe('—');
    expect(formatDuration(-1)).toBe('—');
  });
});
