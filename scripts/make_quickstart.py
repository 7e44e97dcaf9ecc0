"""Write examples/quickstart.ipynb (kept as a script so the notebook's source stays reviewable)."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

PROMPT = "generate a stable diffusion prompt for"
CONCEPTS = ["Neural Networks", "Machine Learning", "Quantum Computing"]

cells = [
    new_markdown_cell(
        "# ipylora quick start\n\n"
        "The seed recipe, inside the notebook: a concept/description table, the `###Human:` / "
        "`### Assistant:` template, a LoRA adapter trained on a resident base model, and a chat "
        "before and after. With no `--model`, ipylora uses its embedded tiny Llama (built offline "
        "in seconds), so this runs anywhere in about a minute; pass `--model` for a real one."
    ),
    new_code_cell("%load_ext ipylora"),
    new_markdown_cell("## 1. Data\nGreen tokens carry the loss (the response and EOS); grey ones are the prompt."),
    new_code_cell(
        f'%lora_dataset concepts --from data/concepts.csv --template human-assistant '
        f'--prompt "{PROMPT} {{concept}}" --response "{{description}}"'
    ),
    new_markdown_cell("## 2. Before training\nThe untrained base model rambles and never emits EOS."),
    *[new_code_cell(f"%lora_chat --max-new-tokens 40 {PROMPT} {c}") for c in CONCEPTS],
    new_markdown_cell("## 3. Train\nThe plot updates in place; interrupt the kernel to stop early and keep the adapter."),
    new_code_cell("%lora_train concepts --name sd-prompts"),
    new_markdown_cell("## 4. After training\nThe same model, still resident, now with the `sd-prompts` adapter."),
    *[new_code_cell(f"%lora_chat {PROMPT} {c}") for c in CONCEPTS],
    new_code_cell("%lora_status"),
]
notebook = new_notebook(cells=cells, metadata={
    "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
    "language_info": {"name": "python"},
})
path = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"
nbformat.write(notebook, path)
print(path)
