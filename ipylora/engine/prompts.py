"""Prompt-only data for methods that generate their own answers (GRPO): the `prompts` format and the
prompt side of any dataset.

`prompts` reads a `prompt` column (text, or TRL's conversational prompt: a list of messages that
ends with a user turn) and an optional `system` column; the other columns stay in the table and
reach reward functions as keyword arguments. A `messages` / `conversations` column whose rows all
end with a user turn (no answers at all) is prompt-only data too (`data.LoraDataset` sets its kind).
Any other dataset serves as well: SFT rows give the prompt side of their last answer (system,
earlier turns, the last user turn), preference rows their prompt. Prompts are laid out by the
dataset's template exactly as chat sends them (`chat.template_prompt_ids`), so the completions
the model samples during training follow the layout chat will use.
"""

from __future__ import annotations

from ipylora.engine.errors import DatasetError
from ipylora.engine.formats import Format, Messages

PROMPT_KIND = "prompt"


def _build_prompts(values: dict) -> list[Messages]:
    from ipylora.engine.preference import _messages, _with_system

    systems = values.get("system") or [""] * len(values["prompt"])
    out = []
    for row, (cell, system) in enumerate(zip(values["prompt"], systems), start=1):
        messages = _messages(cell, row, "prompt")
        if messages is None:
            if not str(cell).strip():
                raise DatasetError(f"Row {row} of 'prompt' is empty: give every row a prompt or drop the row.")
            messages = [{"role": "user", "content": str(cell)}]
        if messages[-1]["role"] != "user":
            raise DatasetError(f"Row {row} of 'prompt' ends with a {messages[-1]['role']} turn: a prompt ends with "
                               "the user turn the model answers; drop the trailing turn.")
        out.append(_with_system(messages, system))
    return out


PROMPTS = Format("prompts", ("prompt",), ("system",),
                 columns={"prompt": ("prompt", "question", "query", "problem"), "system": ("system",)},
                 build=_build_prompts, aliases=("prompt", "prompt-only"), kind=PROMPT_KIND)
"""Detected last, after the SFT formats and only when no two-column table could be a prompt and
its answer (formats.resolve), so SFT data keeps its format."""


def prompt_sides(dataset) -> list[Messages]:
    """The prompt of every table row as messages (system, earlier turns, the user turn to answer)."""
    from ipylora.engine.preference import PREFERENCE_KIND, UNPAIRED_KIND

    if dataset.kind in (PREFERENCE_KIND, UNPAIRED_KIND):  # one per table row, as the reward columns are
        return [[dict(m) for m in row.prompt] for row in dataset.preference_rows()]
    if dataset.text_mode and not dataset.marker:
        raise DatasetError(f"Dataset {dataset.name!r} is whole texts, with no prompt to answer: redefine it with a "
                           "prompt column (--format prompts --columns prompt=COLUMN), or mark where answers start "
                           "with --response-after MARKER.")
    return [dataset.prompt_messages(row) for row in range(len(dataset.conversations()))]


def prompt_tokens(dataset, tokenizer, max_length: int, rows=None):
    """`prompt_ids` (the template's prompt side, as chat sends it), `_row` (the table row) and
    `_prompt_text` (the last user turn, what reward functions get as `prompts`) per row.

    A prompt longer than `max_length` loses tokens from its start (a BOS stays), counted in
    `.truncation` as for SFT rows; the completion's room is the method's own length cap.
    """
    from ipylora.engine.chat import template_prompt_ids
    from ipylora.engine.data import Tokens, Truncation

    template = dataset.template
    sides = prompt_sides(dataset)
    picked = range(len(sides)) if rows is None else [int(r) for r in rows]
    report = Truncation(max_length=max_length)
    tokens = Tokens(prompt_ids=[], _row=[], _prompt_text=[])
    bos = getattr(tokenizer, "bos_token_id", None)
    for row in picked:
        ids = template_prompt_ids(tokenizer, template, sides[row])
        if len(ids) > max_length:
            head = 1 if bos is not None and ids and ids[0] == bos else 0
            ids = ids[:head] + ids[len(ids) - (max_length - head):]
            report.cut_prompt += 1
        report.rows += 1
        tokens["prompt_ids"].append(ids)
        tokens["_row"].append(row)
        tokens["_prompt_text"].append(next((m["content"] for m in reversed(sides[row]) if m["role"] == "user"), ""))
    tokens.truncation = report
    return tokens
