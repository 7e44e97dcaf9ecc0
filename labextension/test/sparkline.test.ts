import { describe, expect, it } from 'vitest';

import { sparkline } from '../src/sparkline';

function coords(path: string): Array<[string, number, number]> {
  return path
    .split(' ')
    .filter(p => p)
    .map(p => {
      const [x, y] = p.slice(1).split(',').map(Number);
      return [p[0], x, y];
    });
}

describe('sparkline', () => {
  it('is empty without finite points', () => {
    expect(sparkline([], 100, 20).path).toBe('');
    expect(sparkline([null, null], 100, 20).points).toBe(0);
  });

  it('maps the highest loss to the top and the lowest to the bottom', () => {
    const line = sparkline([3, 2, 1], 100, 20, 0);
    expect(coords(line.path)).toEqual([
      ['M', 0, 0],
      ['L', 50, 10],
      ['L', 100, 20]
    ]);
    expect([line.min, line.max, line.last, line.points]).toEqual([1, 3, 1, 3]);
  });

  it('breaks the line at non-finite losses instead of drawing zero', () => {
    const line = sparkline([2, null, 1, 1.5], 30, 10, 0);
    const moves = coords(line.path).map(c => c[0]);
    expect(moves).toEqual(['M', 'M', 'L']);
    expect(line.min).toBe(1);
  });

  it('draws a flat run in the middle and a single point centred', () => {
    expect(coords(sparkline([1, 1], 10, 10, 0).path).map(c => c[2])).toEqual([5, 5]);
    expect(coords(sparkline([4], 10, 10, 1).path)).toEqual([['M', 5, 5]]);
  });

  it('keeps points inside the padding', () => {
    for (const [, x, y] of coords(sparkline([5, 0, 9, 3], 50, 20, 2).path)) {
      expect(x).toBeGreaterThanOrEqual(2);
      expect(x).toBeLessThanOrEqual(48);
      expect(y).toBeGreaterThanOrEqual(2);
      expect(y).toBeLessThanOrEqual(18);
    }
  });
});
