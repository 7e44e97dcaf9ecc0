/**
 * What a `%%lora_dataset` cell contains, and its tokens, as plain functions.
 *
 * The notebook highlights every cell as IPython. For a dataset cell that is
 * wrong: the body is CSV, JSON(L) or YAML. `analyzeCell` finds the magic line
 * and decides the body format (a `--reader`/`--format` flag wins; otherwise the body is
 * sniffed), and `tokenize` splits the body into ranges that the CodeMirror
 * plugin in `highlight.ts` turns into CSS classes. No editor code here, so all
 * of it is unit tested.
 */

export type DatasetFormat = 'csv' | 'json' | 'yaml';

export const MAGIC = '%%lora_dataset';

export interface ICellAnalysis {
  format: DatasetFormat | null;
  /** How the format was decided. */
  source: 'flag' | 'content' | 'none';
  /** Offset of the end of the magic line (before its newline). */
  magicEnd: number;
  /** Offset where the body starts (after the magic line's newline). */
  bodyStart: number;
  /** Ranges on the magic line: the magic name, flags and their values. */
  magicTokens: IToken[];
}

export type TokenKind =
  | 'magic'
  | 'flag'
  | 'header'
  | 'separator'
  | 'string'
  | 'number'
  | 'key'
  | 'literal'
  | 'punctuation'
  | 'comment';

export interface IToken {
  from: number;
  to: number;
  kind: TokenKind;
}

const FORMAT_ALIASES: Record<string, DatasetFormat> = {
  csv: 'csv',
  tsv: 'csv',
  json: 'json',
  jsonl: 'json',
  ndjson: 'json',
  yaml: 'yaml',
  yml: 'yaml'
};

/** `null` when the text is not a `%%lora_dataset` cell. */
export function analyzeCell(text: string): ICellAnalysis | null {
  if (!text.startsWith(MAGIC)) {
    return null;
  }
  const after = text.charAt(MAGIC.length);
  if (after !== '' && !/\s/.test(after)) {
    return null; // %%lora_datasets, %%lora_dataset_x: some other magic
  }
  const newline = text.indexOf('\n');
  const magicEnd = newline === -1 ? text.length : newline;
  const bodyStart = newline === -1 ? text.length : newline + 1;
  const line = text.slice(0, magicEnd);
  const magicTokens = tokenizeMagicLine(line);
  const flagged = formatFromFlag(line);
  if (flagged !== null) {
    return { format: flagged, source: 'flag', magicEnd, bodyStart, magicTokens };
  }
  const sniffed = sniffFormat(text.slice(bodyStart));
  return {
    format: sniffed,
    source: sniffed === null ? 'none' : 'content',
    magicEnd,
    bodyStart,
    magicTokens
  };
}

/**
 * The body format named by `--reader X` (how the magic parses the body), else by `--format X`
 * (which older lines used for that, and which otherwise names a data format such as alpaca).
 */
export function formatFromFlag(magicLine: string): DatasetFormat | null {
  const named: Record<string, DatasetFormat | null> = { reader: null, format: null };
  for (const match of magicLine.matchAll(/(?:^|\s)--(reader|format)(?:=|\s+)["']?([A-Za-z]+)/g)) {
    named[match[1]] = named[match[1]] ?? FORMAT_ALIASES[match[2].toLowerCase()] ?? null;
  }
  return named.reader ?? named.format;
}

/** Guess the format of a dataset body from its first non-blank line. */
export function sniffFormat(body: string): DatasetFormat | null {
  const first = body.split('\n').find(l => l.trim() !== '' && !l.trim().startsWith('#'));
  if (first === undefined) {
    return null;
  }
  const line = first.trim();
  if (line.startsWith('{') || line.startsWith('[')) {
    return 'json';
  }
  if (line === '---' || line.startsWith('- ') || line === '-') {
    return 'yaml';
  }
  // `key: value` before any comma is YAML; a CSV header has its comma first.
  const colon = /^[A-Za-z_][\w .-]*:(\s|$)/.exec(line);
  const comma = line.search(/[,\t;]/);
  if (colon && (comma === -1 || comma > colon[0].length)) {
    return 'yaml';
  }
  return 'csv';
}

function tokenizeMagicLine(line: string): IToken[] {
  const tokens: IToken[] = [{ from: 0, to: MAGIC.length, kind: 'magic' }];
  const re = /(--?[A-Za-z][\w-]*)|("(?:[^"\\]|\\.)*"?|'(?:[^'\\]|\\.)*'?)/g;
  re.lastIndex = MAGIC.length;
  let m: RegExpExecArray | null;
  while ((m = re.exec(line)) !== null) {
    // A dash inside a word (e.g. human-assistant) is not a flag.
    if (m[1] !== undefined && m.index > 0 && !/\s/.test(line.charAt(m.index - 1))) {
      continue;
    }
    tokens.push({
      from: m.index,
      to: m.index + m[0].length,
      kind: m[1] !== undefined ? 'flag' : 'string'
    });
  }
  return tokens;
}

/** Tokens of a dataset body; offsets are relative to `body`. */
export function tokenize(format: DatasetFormat, body: string): IToken[] {
  switch (format) {
    case 'csv':
      return tokenizeCsv(body);
    case 'json':
      return tokenizeJson(body);
    case 'yaml':
      return tokenizeYaml(body);
  }
}

const NUMBER = /^-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$/;

function tokenizeCsv(body: string): IToken[] {
  const tokens: IToken[] = [];
  const firstLine = body.split('\n').find(l => l.trim() !== '') ?? '';
  const sep = firstLine.includes('\t') && !firstLine.includes(',') ? '\t' : ',';
  let row = 0;
  let i = 0;
  let fieldStart = 0;
  let sawContent = false;
  const pushField = (from: number, to: number): void => {
    const raw = body.slice(from, to);
    const lead = raw.length - raw.trimStart().length;
    const trail = raw.length - raw.trimEnd().length;
    const a = from + lead;
    const b = to - trail;
    if (b <= a) {
      return;
    }
    const text = body.slice(a, b);
    let kind: TokenKind | null = null;
    if (row === 0) {
      kind = 'header';
    } else if (text.startsWith('"')) {
      kind = 'string';
    } else if (NUMBER.test(text)) {
      kind = 'number';
    }
    if (kind !== null) {
      tokens.push({ from: a, to: b, kind });
    }
  };
  while (i <= body.length) {
    const ch = body.charAt(i);
    if (ch === '"') {
      // Quoted field: "" is an escaped quote, newlines inside are part of it.
      i++;
      while (i < body.length) {
        if (body.charAt(i) === '"') {
          if (body.charAt(i + 1) === '"') {
            i += 2;
            continue;
          }
          break;
        }
        i++;
      }
      i++;
      sawContent = true;
      continue;
    }
    if (ch === sep) {
      pushField(fieldStart, i);
      tokens.push({ from: i, to: i + 1, kind: 'separator' });
      fieldStart = i + 1;
      sawContent = true;
    } else if (ch === '\n' || i === body.length) {
      pushField(fieldStart, i);
      if (sawContent || body.slice(fieldStart, i).trim() !== '') {
        row++;
      }
      sawContent = false;
      fieldStart = i + 1;
    } else if (ch.trim() !== '') {
      sawContent = true;
    }
    i++;
  }
  return tokens;
}

function tokenizeJson(body: string): IToken[] {
  const tokens: IToken[] = [];
  const re =
    /("(?:[^"\\\n]|\\.)*"?)|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|\b(true|false|null)\b|([{}[\]:,])/g;
  let m: RegExpExecArray | null;
  while ((m = re.exec(body)) !== null) {
    const from = m.index;
    const to = from + m[0].length;
    if (m[1] !== undefined) {
      const rest = body.slice(to);
      tokens.push({ from, to, kind: /^\s*:/.test(rest) ? 'key' : 'string' });
    } else if (m[2] !== undefined) {
      tokens.push({ from, to, kind: 'number' });
    } else if (m[3] !== undefined) {
      tokens.push({ from, to, kind: 'literal' });
    } else {
      tokens.push({ from, to, kind: 'punctuation' });
    }
  }
  return tokens;
}

function tokenizeYaml(body: string): IToken[] {
  const tokens: IToken[] = [];
  let offset = 0;
  for (const line of body.split('\n')) {
    tokenizeYamlLine(line, offset, tokens);
    offset += line.length + 1;
  }
  return tokens;
}

function tokenizeYamlLine(line: string, offset: number, out: IToken[]): void {
  let i = 0;
  while (i < line.length && line.charAt(i) === ' ') {
    i++;
  }
  if (line.charAt(i) === '#') {
    out.push({ from: offset + i, to: offset + line.length, kind: 'comment' });
    return;
  }
  if (line.trim() === '---') {
    out.push({ from: offset + i, to: offset + i + 3, kind: 'punctuation' });
    return;
  }
  while (line.charAt(i) === '-' && (line.charAt(i + 1) === ' ' || i + 1 === line.length)) {
    out.push({ from: offset + i, to: offset + i + 1, kind: 'punctuation' });
    i += 2;
  }
  const key = /^([A-Za-z_"'][^:#]*?):(?=\s|$)/.exec(line.slice(i));
  if (key) {
    out.push({ from: offset + i, to: offset + i + key[1].length, kind: 'key' });
    out.push({
      from: offset + i + key[1].length,
      to: offset + i + key[1].length + 1,
      kind: 'punctuation'
    });
    i += key[0].length;
  }
  while (i < line.length && line.charAt(i) === ' ') {
    i++;
  }
  const rest = line.slice(i);
  if (rest === '') {
    return;
  }
  const comment = rest.search(/\s#/);
  const value = (comment === -1 ? rest : rest.slice(0, comment)).trimEnd();
  if (value.startsWith('"') || value.startsWith("'")) {
    out.push({ from: offset + i, to: offset + i + value.length, kind: 'string' });
  } else if (NUMBER.test(value)) {
    out.push({ from: offset + i, to: offset + i + value.length, kind: 'number' });
  } else if (/^(true|false|null|yes|no|~)$/i.test(value)) {
    out.push({ from: offset + i, to: offset + i + value.length, kind: 'literal' });
  } else if (value.startsWith('|') || value.startsWith('>')) {
    out.push({ from: offset + i, to: offset + i + 1, kind: 'punctuation' });
  } else if (value !== '') {
    out.push({ from: offset + i, to: offset + i + value.length, kind: 'string' });
  }
  if (comment !== -1) {
    out.push({ from: offset + i + comment + 1, to: offset + line.length, kind: 'comment' });
  }
}
