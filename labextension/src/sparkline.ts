/**
 * Loss sparkline geometry, kept free of DOM code so it can be unit tested.
 *
 * The kernel sends the recent losses; a `null` is a step whose loss was not
 * finite (NaN/inf). The line breaks there instead of plunging to zero, so a
 * diverging run is visible as a gap, not as a fake improvement.
 */

export interface ISparkline {
  /** SVG path `d` attribute; empty when there is nothing to draw. */
  path: string;
  min: number | null;
  max: number | null;
  /** Last finite loss, for the label next to the line. */
  last: number | null;
  /** Number of finite points drawn. */
  points: number;
}

export const EMPTY_SPARKLINE: ISparkline = {
  path: '',
  min: null,
  max: null,
  last: null,
  points: 0
};

/**
 * Map losses onto a `width` x `height` box (y grows downwards, as in SVG),
 * leaving `pad` pixels on each side so the stroke is not clipped.
 */
export function sparkline(
  loss: ReadonlyArray<number | null>,
  width: number,
  height: number,
  pad = 1
): ISparkline {
  const finite = loss.filter((v): v is number => v !== null && Number.isFinite(v));
  if (finite.length === 0) {
    return EMPTY_SPARKLINE;
  }
  const min = Math.min(...finite);
  const max = Math.max(...finite);
  const span = max - min;
  const innerW = Math.max(width - 2 * pad, 0);
  const innerH = Math.max(height - 2 * pad, 0);
  const stepX = loss.length > 1 ? innerW / (loss.length - 1) : 0;
  const y = (v: number): number =>
    // A flat line sits in the middle rather than on an edge.
    span === 0 ? pad + innerH / 2 : pad + innerH * (1 - (v - min) / span);

  const parts: string[] = [];
  let penDown = false;
  loss.forEach((v, i) => {
    if (v === null || !Number.isFinite(v)) {
      penDown = false;
      return;
    }
    const x = loss.length > 1 ? pad + i * stepX : pad + innerW / 2;
    parts.push(`${penDown ? 'L' : 'M'}${round(x)},${round(y(v))}`);
    penDown = true;
  });
  return {
    path: parts.join(' '),
    min,
    max,
    last: finite[finite.length - 1],
    points: finite.length
  };
}

function round(v: number): number {
  return Math.round(v * 100) / 100;
}
