/**
 * CodeMirror 6 plugin that highlights `%%lora_dataset` cells.
 *
 * It only adds decorations: the magic line gets `cm-ipylora-magic-line` (the
 * magic name `cm-ipylora-magic`, flags `cm-ipylora-flag`), each body line
 * `cm-ipylora-body cm-ipylora-body-<format>`, and each token
 * `cm-ipylora-tok cm-ipylora-<kind>`. The stylesheet makes the Python colours
 * inherit inside those lines, so the body reads as CSV/JSON/YAML. Any other
 * cell gets no decoration at all.
 */

import { Extension, Prec, Range } from '@codemirror/state';
import {
  Decoration,
  DecorationSet,
  EditorView,
  ViewPlugin,
  ViewUpdate
} from '@codemirror/view';

import { MAGIC, analyzeCell, tokenize } from './datasetFormat';

/** Past this size the body keeps its line classes but is not tokenized. */
const MAX_TOKENIZED = 200_000;

const markCache = new Map<string, Decoration>();
function mark(className: string): Decoration {
  let deco = markCache.get(className);
  if (!deco) {
    deco = Decoration.mark({ class: className });
    markCache.set(className, deco);
  }
  return deco;
}

const lineCache = new Map<string, Decoration>();
function line(className: string): Decoration {
  let deco = lineCache.get(className);
  if (!deco) {
    deco = Decoration.line({ class: className });
    lineCache.set(className, deco);
  }
  return deco;
}

export function buildDecorations(view: EditorView): DecorationSet {
  const doc = view.state.doc;
  if (doc.length < MAGIC.length || !doc.line(1).text.startsWith(MAGIC)) {
    return Decoration.none;
  }
  // Markdown and raw cells are prose, whatever their first line says.
  if (view.dom.closest('.jp-MarkdownCell, .jp-RawCell') !== null) {
    return Decoration.none;
  }
  const text = doc.toString();
  const analysis = analyzeCell(text);
  if (analysis === null) {
    return Decoration.none;
  }
  const ranges: Range<Decoration>[] = [line('cm-ipylora-magic-line').range(0)];
  for (const t of analysis.magicTokens) {
    ranges.push(mark(`cm-ipylora-${t.kind}`).range(t.from, t.to));
  }
  if (analysis.format !== null && analysis.bodyStart < doc.length) {
    const bodyClass = `cm-ipylora-body cm-ipylora-body-${analysis.format}`;
    const first = doc.lineAt(analysis.bodyStart).number;
    for (let n = first; n <= doc.lines; n++) {
      ranges.push(line(bodyClass).range(doc.line(n).from));
    }
    const body = text.slice(analysis.bodyStart);
    if (body.length <= MAX_TOKENIZED) {
      for (const t of tokenize(analysis.format, body)) {
        if (t.to > t.from) {
          ranges.push(
            mark(`cm-ipylora-tok cm-ipylora-${t.kind}`).range(
              analysis.bodyStart + t.from,
              analysis.bodyStart + t.to
            )
          );
        }
      }
    }
  }
  return Decoration.set(ranges, true);
}

const datasetPlugin = ViewPlugin.fromClass(
  class {
    decorations: DecorationSet;

    constructor(view: EditorView) {
      this.decorations = buildDecorations(view);
    }

    update(update: ViewUpdate): void {
      if (update.docChanged) {
        this.decorations = buildDecorations(update.view);
      }
    }
  },
  { decorations: plugin => plugin.decorations }
);

/** The extension to register with JupyterLab's editor extension registry. */
export function datasetHighlighting(): Extension {
  // Lowest precedence: our marks wrap the Python token spans instead of
  // being split by them, so a flag or a CSV field is one element.
  return Prec.lowest(datasetPlugin);
}
