"""From a table to training examples: column mapping, template, tokens and the loss mask.

A `LoraDataset` keeps the user's table and how to read it. `pairs()` renders each row into
(prompt side, response side) text through the template; `tokenize()` turns those into
`input_ids` and `labels`, where prompt tokens are -100 and the response plus EOS carry loss.
The mask is built from the token positions themselves (prompt and response are tokenized
separately), never by looking for token ids, so EOS is trained even when pad == eos.
"""

from __future__ import annotations

import difflib
import string
from dataclasses import dataclass, field

import pandas as pd

from ipylora.engine.config import DataArgs
from ipylora.engine.errors import DatasetError
from ipylora.engine.templates import get_template

IGNORE_INDEX = -100


@dataclass
class LoraDataset:
    """A named table plus the mapping from its columns to prompt and response."""

    name: str
    frame: pd.DataFrame
    args: DataArgs = field(default_factory=DataArgs)

    def __post_init__(self):
        self.frame = self.frame.reset_index(drop=True)
        self.frame.columns = [str(c) for c in self.frame.columns]
        self.text_mode, self.prompt_format, self.response_format = _mapping(self.frame, self.args)
        self.template = get_template("plain" if self.text_mode else self.args.template)
        self._pairs = None

    @property
    def columns(self) -> list[str]:
        return list(self.frame.columns)

    def __len__(self) -> int:
        return len(self.frame)

    def pairs(self) -> list[tuple[str, str]]:
        """(prompt side, response side) for every row, rendered through the template."""
        if self._pairs is None:
            prompts = _render_column(self.frame, self.prompt_format, "--prompt")
            responses = _render_column(self.frame, self.response_format, "--response")
            self._pairs = [self.template.render(p, r) for p, r in zip(prompts, responses)]
        return self._pairs

    def tokenize(self, tokenizer, max_length: int, rows: slice | None = None) -> dict[str, list]:
        """`input_ids` and `labels` per row, truncated to `max_length` tokens."""
        pairs = self.pairs()[rows] if rows is not None else self.pairs()
        return tokenize_pairs(pairs, tokenizer, max_length, self.args.train_on_prompt)

    def describe(self) -> dict:
        """What the run records about its data (run.json)."""
        return {
            "name": self.name,
            "rows": len(self),
            "columns": self.columns,
            "prompt": self.prompt_format,
            "response": self.response_format,
            "template": self.template.source,
            "template_name": self.template.name,
            "train_on_prompt": self.args.train_on_prompt,
        }


def tokenize_pairs(pairs, tokenizer, max_length: int, train_on_prompt: bool = False) -> dict[str, list]:
    """Tokenize prompt and response separately (batched), join them, append EOS, build labels."""
    if tokenizer.eos_token_id is None:
        raise DatasetError("The tokenizer has no EOS token, so the model could never learn to stop: set one.")
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=True)["input_ids"] if pairs else []
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"] if pairs else []
    eos = tokenizer.eos_token_id
    input_ids, labels = [], []
    for prompt_ids, response_ids in zip(prompts, responses):
        ids = prompt_ids + response_ids + [eos]
        mask = prompt_ids if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
        input_ids.append(ids[:max_length])
        labels.append((mask + response_ids + [eos])[:max_length])
    return {"input_ids": input_ids, "labels": labels}


def _mapping(frame: pd.DataFrame, args: DataArgs) -> tuple[bool, str, str]:
    """(text mode?, prompt format, response format) from the flags or the table's shape."""
    columns = list(frame.columns)
    if args.prompt is None and args.response is None:
        if "text" in columns:
            return True, "", "{text}"
        if len(columns) >= 2:
            return False, "{" + columns[0] + "}", "{" + columns[1] + "}"
        raise DatasetError(
            f"The table has one column ({columns[0]!r}): name it 'text' to train on it as is, "
            "or add a response column and pass --prompt/--response."
        )
    if args.prompt is None or args.response is None:
        missing = "--prompt" if args.prompt is None else "--response"
        raise DatasetError(f"Pass {missing} too: --prompt and --response go together.")
    for flag, fmt in (("--prompt", args.prompt), ("--response", args.response)):
        _check_fields(fmt, flag, columns)
    return False, args.prompt, args.response


def _fields(fmt: str, flag: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None]
    except ValueError as exc:
        raise DatasetError(f"{flag} {fmt!r} is not a valid format string ({exc}): write {{{{ for a literal brace.") from None


def _check_fields(fmt: str, flag: str, columns: list[str]) -> None:
    names = _fields(fmt, flag)
    if fmt.strip() and not names:
        raise DatasetError(f"{flag} {fmt!r} names no column: use {{column}}, e.g. {{{columns[0]}}}.")
    for name in names:
        if name in columns:
            continue
        if name == "":
            raise DatasetError(f"{flag} {fmt!r} has an empty {{}}: name a column, e.g. {{{columns[0]}}}.")
        lower = {c.lower(): c for c in columns}
        guess = lower.get(name.lower()) or next(iter(difflib.get_close_matches(name, columns, n=1)), None)
        hint = f" Did you mean {{{guess}}}?" if guess else ""
        raise DatasetError(
            f"{flag} uses {{{name}}}, but the columns are: {', '.join(columns)}.{hint}"
        )


def _render_column(frame: pd.DataFrame, fmt: str, flag: str) -> list[str]:
    names = _fields(fmt, flag)
    if not names:
        return [fmt] * len(frame)
    sub = frame[list(dict.fromkeys(names))]
    missing = sub.isna().any(axis=1)
    if missing.any():
        rows = [int(i) + 1 for i in missing[missing].index[:5]]
        raise DatasetError(
            f"{flag} {fmt!r}: row(s) {', '.join(map(str, rows))} have empty cells "
            f"({missing.sum()} rows in all). Fill them or drop those rows."
        )
    records = sub.astype(str).to_dict("records")
    return [fmt.format_map(record) for record in records]
