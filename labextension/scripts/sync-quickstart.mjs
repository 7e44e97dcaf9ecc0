// Make src/quickstart.json, the notebook the launcher item "LoRA fine-tuning
// notebook" creates, from ../examples/quickstart.ipynb:
// - outputs and execution counts cleared;
// - a `%lora_dataset NAME --from data/FILE.csv ...` line becomes an inline
//   `%%lora_dataset NAME ...` cell holding the file's rows, because the new
//   notebook is created in whatever folder the launcher is in, where
//   data/FILE.csv does not exist.
// test/quickstart.test.ts checks the result against the example.
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const examples = join(here, '..', '..', 'examples');
const target = join(here, '..', 'src', 'quickstart.json');
const nb = JSON.parse(readFileSync(join(examples, 'quickstart.ipynb'), 'utf8'));
const FROM = /^%lora_dataset (\S+) --from (\S+\.csv)(.*)$/;
nb.cells = nb.cells.map((cell, i) => {
  const source = Array.isArray(cell.source) ? cell.source.join('') : cell.source;
  const out = { ...cell, id: cell.id ?? `ipylora-quickstart-${i}`, source };
  if (cell.cell_type === 'code') {
    out.outputs = [];
    out.execution_count = null;
    const m = FROM.exec(source.trim());
    if (m) {
      const rows = readFileSync(join(examples, m[2]), 'utf8').trimEnd();
      out.source = `%%lora_dataset ${m[1]}${m[3]}\n${rows}`;
    }
  }
  return out;
});
writeFileSync(target, JSON.stringify(nb, null, 1) + '\n');
console.log(`${target}: ${nb.cells.length} cells from examples/quickstart.ipynb`);
