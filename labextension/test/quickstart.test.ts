import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import { analyzeCell } from '../src/datasetFormat';
import quickstart from '../src/quickstart.json';

const EXAMPLES = join(__dirname, '..', '..', 'examples');
const EXAMPLE = join(EXAMPLES, 'quickstart.ipynb');
const FROM = /^%lora_dataset (\S+) --from (\S+\.csv)(.*)$/;

const sources = (nb: { cells: Array<{ source: string | string[] }> }): string[] =>
  nb.cells.map(c => (Array.isArray(c.source) ? c.source.join('') : c.source));

describe('quickstart template (launcher item)', () => {
  it('is an nbformat 4 notebook that loads ipylora and has an inline CSV dataset cell', () => {
    expect(quickstart.nbformat).toBe(4);
    const code = sources(quickstart);
    expect(code).toContain('%load_ext ipylora');
    expect(code.some(s => analyzeCell(s)?.format === 'csv')).toBe(true);
    expect(code.some(s => / --from /.test(s))).toBe(false);
  });

  it.runIf(existsSync(EXAMPLE))(
    'matches examples/quickstart.ipynb, --from CSV inlined (else: npm run sync:quickstart)',
    () => {
      const expected = sources(JSON.parse(readFileSync(EXAMPLE, 'utf8'))).map(source => {
        const m = FROM.exec(source.trim());
        if (!m) {
          return source;
        }
        const rows = readFileSync(join(EXAMPLES, m[2]), 'utf8').trimEnd();
        return `%%lora_dataset ${m[1]}${m[3]}\n${rows}`;
      });
      expect(sources(quickstart)).toEqual(expected);
    }
  );
});
