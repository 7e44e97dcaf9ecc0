import { describe, expect, it } from 'vitest';

import { analyzeCell, formatFromFlag, sniffFormat, tokenize } from '../src/datasetFormat';

const text = (body: string, tokens: ReturnType<typeof tokenize>, kind: string): string[] =>
  tokens.filter(t => t.kind === kind).map(t => body.slice(t.from, t.to));

describe('analyzeCell', () => {
  it('ignores other cells', () => {
    expect(analyzeCell('print(1)')).toBeNull();
    expect(analyzeCell('%%lora_datasets x\na,b')).toBeNull();
    expect(analyzeCell(' %%lora_dataset x\na,b')).toBeNull();
    expect(analyzeCell('# %%lora_dataset\na,b')).toBeNull();
  });

  it('sniffs CSV, JSON and YAML bodies', () => {
    expect(analyzeCell('%%lora_dataset d\nconcept,description\na,b')?.format).toBe('csv');
    expect(analyzeCell('%%lora_dataset d\n[{"a": 1}]')?.format).toBe('json');
    expect(analyzeCell('%%lora_dataset d\n{"a": 1}\n{"a": 2}')?.format).toBe('json');
    expect(analyzeCell('%%lora_dataset d\n- concept: ML\n  description: x')?.format).toBe('yaml');
    expect(analyzeCell('%%lora_dataset d\nconcept: ML')?.format).toBe('yaml');
  });

  it('lets --format win over the content', () => {
    const a = analyzeCell('%%lora_dataset d --format yaml\nconcept,description');
    expect(a?.format).toBe('yaml');
    expect(a?.source).toBe('flag');
    expect(analyzeCell('%%lora_dataset d --format=jsonl\nx')?.format).toBe('json');
  });

  it('has no body format for --from cells', () => {
    const a = analyzeCell('%%lora_dataset d --from data.csv');
    expect(a?.format).toBeNull();
    expect(a?.bodyStart).toBe('%%lora_dataset d --from data.csv'.length);
  });

  it('marks the magic name, flags and quoted values on the magic line', () => {
    const line = '%%lora_dataset concepts --template human-assistant --prompt "for {concept}"';
    const a = analyzeCell(line + '\na,b')!;
    const kinds = a.magicTokens.map(t => [t.kind, line.slice(t.from, t.to)]);
    expect(kinds).toEqual([
      ['magic', '%%lora_dataset'],
      ['flag', '--template'],
      ['flag', '--prompt'],
      ['string', '"for {concept}"']
    ]);
  });
});

describe('formatFromFlag / sniffFormat', () => {
  it('reads known formats only', () => {
    expect(formatFromFlag('%%lora_dataset d --format YML')).toBe('yaml');
    expect(formatFromFlag('%%lora_dataset d --format parquet')).toBeNull();
    expect(formatFromFlag('%%lora_dataset d --formats csv')).toBeNull();
    expect(formatFromFlag('%%lora_dataset d --reader jsonl')).toBe('json');
    expect(formatFromFlag('%%lora_dataset d --format alpaca --reader yaml')).toBe('yaml');
    expect(formatFromFlag('%%lora_dataset d --reader csv --format yaml')).toBe('csv');
  });

  it('sees a CSV header with a colon later as CSV', () => {
    expect(sniffFormat('prompt,response\n"a: b",c')).toBe('csv');
    expect(sniffFormat('\n\n# comment\nname: x')).toBe('yaml');
    expect(sniffFormat('   \n')).toBeNull();
  });
});

describe('tokenize', () => {
  it('CSV: header, separators, quoted fields with commas, escaped quotes and newlines', () => {
    const body = 'concept,description\nML,"learns, from ""data""\nmore"\nPi,3.14\n';
    const tokens = tokenize('csv', body);
    expect(text(body, tokens, 'header')).toEqual(['concept', 'description']);
    expect(text(body, tokens, 'string')).toEqual(['"learns, from ""data""\nmore"']);
    expect(text(body, tokens, 'number')).toEqual(['3.14']);
    expect(text(body, tokens, 'separator')).toHaveLength(3);
  });

  it('JSON: keys, strings, numbers, literals', () => {
    const body = '{"concept": "ML", "n": -1.5e3, "ok": true, "x": null}';
    const tokens = tokenize('json', body);
    expect(text(body, tokens, 'key')).toEqual(['"concept"', '"n"', '"ok"', '"x"']);
    expect(text(body, tokens, 'string')).toEqual(['"ML"']);
    expect(text(body, tokens, 'number')).toEqual(['-1.5e3']);
    expect(text(body, tokens, 'literal')).toEqual(['true', 'null']);
  });

  it('YAML: list dashes, keys, values, comments', () => {
    const body = '# data\n- concept: ML  # first\n  description: "learns"\n  rows: 3\n  ok: yes';
    const tokens = tokenize('yaml', body);
    expect(text(body, tokens, 'key')).toEqual(['concept', 'description', 'rows', 'ok']);
    expect(text(body, tokens, 'comment')).toEqual(['# data', '# first']);
    expect(text(body, tokens, 'string')).toEqual(['ML', '"learns"']);
    expect(text(body, tokens, 'number')).toEqual(['3']);
    expect(text(body, tokens, 'literal')).toEqual(['yes']);
  });

  it('never produces empty or out-of-range tokens', () => {
    for (const [format, body] of [
      ['csv', 'a,,b\n,\n"unterminated'],
      ['json', '{"a": "unterminated'],
      ['yaml', '-\n:\n- \n  - x: ']
    ] as const) {
      for (const t of tokenize(format, body)) {
        expect(t.to).toBeGreaterThan(t.from);
        expect(t.from).toBeGreaterThanOrEqual(0);
        expect(t.to).toBeLessThanOrEqual(body.length);
      }
    }
  });
});
