"""Formats: how the columns of a table hold a conversation.

Every row becomes a list of messages (`{"role": "system"|"user"|"assistant", "content": str}`);
templates then turn messages into text. A format names the fields it reads (alpaca reads
`instruction`, `input`, `output`), the column names it recognises for each, and how to build
messages from them. The format is detected from the columns unless `--format` names it, and
`--columns field=column,...` maps fields to columns with other names.

Formats are registered in the `ipylora.formats` entry-point group; detection tries them in
registration order, the first whose required fields are all present wins (the preference formats
come first: a table with prompt, completion and label is unpaired preference data, not a pair).

A format's `kind` says what a row is: "sft" (a conversation), "preference" (a prompt with a chosen
and a rejected answer) or "unpaired-preference" (a prompt, a completion and a desirable label);
preference formats also build those rows (`rows`, see preference.py), and their conversations are
the chosen (or desirable) answer, so SFT, chat and eval read them like any other data.
"""

from __future__ import annotations

import difflib
import json
import string
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from ipylora.engine import plugins
from ipylora.engine.errors import DatasetError

Messages = list[dict]


@dataclass(frozen=True)
class Format:
    """One way of laying out conversations in columns."""

    name: str
    """The --format value."""
    required: tuple[str, ...]
    """Fields every row needs."""
    optional: tuple[str, ...] = ()
    """Fields used when present (missing or empty cells are fine)."""
    columns: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Field -> column names recognised for it, most likely first."""
    build: Callable[[dict[str, list]], list[Messages]] | None = None
    """Field -> values (one per row) to messages per row."""
    aliases: tuple[str, ...] = ()
    """Other names accepted by --format / --columns keys (e.g. "response" for "completion")."""
    kind: str = "sft"
    """What a row is: "sft", "preference" or "unpaired-preference" (what training methods check)."""
    rows: Callable[[dict[str, list]], list] | None = None
    """Preference kinds: field -> values to one row object per row (preference.Preference / Unpaired)."""


@dataclass
class Mapping:
    """A format plus where each of its fields comes from."""

    format: Format
    fields: dict[str, str]
    """Field -> format string over the columns ("{concept}" for a plain column)."""

    @property
    def text_mode(self) -> bool:
        return self.format.name == "text"

    def conversations(self, frame: pd.DataFrame) -> list[Messages]:
        values = {f: _render_field(frame, fmt, f, f in self.format.required) for f, fmt in self.fields.items()}
        return self.format.build(values)

    def rows(self, frame: pd.DataFrame) -> list:
        """Preference kinds: one `preference.Preference` / `preference.Unpaired` per row."""
        values = {f: _render_field(frame, fmt, f, f in self.format.required) for f, fmt in self.fields.items()}
        return self.format.rows(values)

    def describe(self) -> dict:
        return {"format": self.format.name, "fields": dict(self.fields)}


def _pair(prompts, responses, systems=None) -> list[Messages]:
    systems = systems or [""] * len(prompts)
    out = []
    for system, prompt, response in zip(systems, prompts, responses):
        conv = [{"role": "system", "content": system}] if system else []
        conv.append({"role": "user", "content": prompt})
        conv.append({"role": "assistant", "content": response})
        out.append(conv)
    return out


def _build_alpaca(v):
    prompts = [f"{i}\n\n{x}" if x.strip() else i for i, x in zip(v["instruction"], v.get("input") or [""] * len(v["instruction"]))]
    return _pair(prompts, v["output"], v.get("system"))


def _build_prompt_completion(v):
    return _pair(v["prompt"], v["completion"], v.get("system"))


def _build_text(v):
    return [[{"role": "assistant", "content": text}] for text in v["text"]]


ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


def _chat_builder(role_key: str, content_key: str, roles: dict, column: str, other: str):
    def build(v):
        out, unanswered = [], []
        for row, cell in enumerate(v[column], start=1):
            turns = _as_list(cell, row, column)
            conv = []
            for number, turn in enumerate(turns, start=1):
                if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
                    keys = ", ".join(map(str, turn)) if isinstance(turn, dict) else type(turn).__name__
                    other_keys = {"role", "content"} if role_key == "from" else {"from", "value"}
                    looks_other = isinstance(turn, dict) and other_keys <= set(turn)
                    raise DatasetError(
                        f"Row {row}, message {number} of {column!r} has {keys}, not {role_key!r} and {content_key!r}"
                        + (f": this looks like --format {other}." if looks_other else ".")
                    )
                role = roles.get(str(turn[role_key]).lower())
                if role is None:
                    raise DatasetError(f"Row {row}, message {number} has {role_key} {turn[role_key]!r}: use one of "
                                       f"{', '.join(roles)}.")
                content = turn[content_key]
                conv.append({"role": role, "content": "" if content is None else str(content)})
            if not any(m["role"] == "assistant" for m in conv):
                unanswered.append(row)
            out.append(conv)
        # Rows that all end with a user turn and answer nothing are prompts (GRPO data, prompts.py).
        if unanswered and (len(unanswered) < len(out) or any(conv[-1]["role"] != "user" for conv in out)):
            raise DatasetError(f"Row {unanswered[0]} of {column!r} has no assistant turn, so nothing would be trained: "
                               "add one or drop the row.")
        return out

    return build


def _as_list(cell, row: int, column: str) -> list:
    if isinstance(cell, str):  # a JSON string in a CSV cell
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"Row {row} of {column!r} is text, not a list of messages (JSON error at column "
                               f"{exc.colno}: {exc.msg}). Store a list of {{role, content}} objects.") from None
    if hasattr(cell, "tolist"):  # numpy arrays from parquet / arrow
        cell = cell.tolist()
    if not isinstance(cell, (list, tuple)) or not cell:
        raise DatasetError(f"Row {row} of {column!r} is {type(cell).__name__}, not a non-empty list of messages.")
    return list(cell)


MESSAGES = Format("messages", ("messages",), columns={"messages": ("messages",)},
                  build=_chat_builder("role", "content", ROLES, "messages", "sharegpt"), aliases=("conversational",))
SHAREGPT = Format("sharegpt", ("conversations",), columns={"conversations": ("conversations",)},
                  build=_chat_builder("from", "value", SHAREGPT_ROLES, "conversations", "messages"))
ALPACA = Format("alpaca", ("instruction", "output"), ("input", "system"),
                columns={"instruction": ("instruction",), "output": ("output",), "input": ("input",),
                         "system": ("system",)},
                build=_build_alpaca)
PROMPT_COMPLETION = Format(
    "prompt-completion", ("prompt", "completion"), ("system",),
    columns={"prompt": ("prompt", "question", "query"), "completion": ("completion", "response", "answer"),
             "system": ("system",)},
    build=_build_prompt_completion, aliases=("prompt/completion", "completion", "pair"),
)
TEXT = Format("text", ("text",), columns={"text": ("text",)}, build=_build_text)

FIELD_ALIASES = {"response": "completion", "answer": "completion", "question": "prompt"}


def all_formats() -> list[Format]:
    return plugins.all_of(plugins.FORMATS)


def find_format(name: str) -> Format:
    for fmt in all_formats():
        if name == fmt.name or name in fmt.aliases:
            return fmt
    known = [f.name for f in all_formats()]
    guess = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {guess[0]}?" if guess else ""
    raise DatasetError(f"Unknown --format {name!r}: use one of {', '.join(known)}.{hint}")


def parse_columns(spec: str | None) -> dict[str, str]:
    """`prompt=concept,response=description` -> {"prompt": "concept", "completion": "description"}."""
    if not spec:
        return {}
    mapping: dict[str, str] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        key, sep, column = (s.strip() for s in part.partition("="))
        if not sep or not key or not column:
            raise DatasetError(f"--columns {spec!r}: {part.strip()!r} is not field=column, e.g. "
                               "--columns prompt=concept,response=description.")
        key = FIELD_ALIASES.get(key, key)
        if key in mapping:
            raise DatasetError(f"--columns {spec!r} maps {key!r} twice: give each field one column.")
        mapping[key] = column
    used = list(mapping.values())
    twice = sorted({c for c in used if used.count(c) > 1})
    if twice:
        raise DatasetError(f"--columns {spec!r} names column {twice[0]!r} twice: map each field to its own column.")
    return mapping


def resolve(frame: pd.DataFrame, fmt_name: str | None, columns: str | None,
            prompt: str | None = None, response: str | None = None) -> Mapping:
    """Which format, and where each field comes from; errors name the columns and the fix."""
    names = list(frame.columns)
    explicit = parse_columns(columns)
    for field_name, column in explicit.items():
        _check_format_string("{" + column + "}" if "{" not in column else column, f"--columns {field_name}=", names)
    if prompt is not None or response is not None:
        if prompt is None or response is None:
            missing = "--prompt" if prompt is None else "--response"
            raise DatasetError(f"Pass {missing} too: --prompt and --response go together.")
        _check_format_string(prompt, "--prompt", names)
        _check_format_string(response, "--response", names)
        fmt = find_format(fmt_name) if fmt_name else PROMPT_COMPLETION
        if fmt.required != PROMPT_COMPLETION.required:
            raise DatasetError(f"--prompt/--response build a prompt/completion pair, but --format is {fmt.name}: "
                               "drop one of them.")
        fields = {"prompt": prompt, "completion": response}
        if "system" in explicit:
            fields["system"] = "{" + explicit["system"] + "}"
        return Mapping(fmt, fields)
    candidates = [find_format(fmt_name)] if fmt_name else all_formats()
    for fmt in candidates:
        if fmt.kind == "prompt" and not fmt_name and not explicit and len(names) == 2:
            continue  # a two-column table is a prompt and its answer (below), as it always was
        known = set(fmt.required) | set(fmt.optional)
        unknown = [k for k in explicit if k not in known]
        if unknown and fmt_name:
            raise DatasetError(f"--columns names {unknown[0]!r}, which --format {fmt.name} does not have: "
                               f"its fields are {', '.join(fmt.required + fmt.optional)}.")
        if unknown:
            continue
        fields = {}
        for f in fmt.required + fmt.optional:
            column = explicit.get(f) or next((c for c in fmt.columns.get(f, (f,)) if c in names), None)
            if column is not None:
                fields[f] = column if "{" in column else "{" + column + "}"
        if all(f in fields for f in fmt.required):
            return Mapping(fmt, fields)
        if fmt_name:
            missing = [f for f in fmt.required if f not in fields]
            raise DatasetError(_missing_field_message(fmt, missing[0], names))
    if not fmt_name and not explicit and len(names) == 2:  # a two-column table: prompt, response
        return Mapping(PROMPT_COMPLETION, {"prompt": "{" + names[0] + "}", "completion": "{" + names[1] + "}"})
    if explicit:
        raise DatasetError(f"--columns {columns!r} does not complete any format: map prompt= and response= "
                           "(or instruction= and output=, messages=, conversations=, text=; prompt=, "
                           "chosen= and rejected=; prompt=, completion= and label=).")
    raise DatasetError(
        f"Cannot tell which columns hold the prompt and the response (columns: {', '.join(map(str, names))}): "
        f"pass --columns prompt={names[0]},response={names[1 if len(names) > 1 else 0]} or --prompt \"{{{names[0]}}}\" --response \"{{{names[1 if len(names) > 1 else 0]}}}\"."
    )


def _missing_field_message(fmt: Format, missing: str, names: list[str]) -> str:
    expected = fmt.columns.get(missing, (missing,))[0]
    guess = next(iter(difflib.get_close_matches(expected, names, n=1, cutoff=0.5)), None)
    hint = f" Did you mean --columns {missing}={guess}?" if guess else f" Map it: --columns {missing}=COLUMN."
    return (f"--format {fmt.name} needs a {expected!r} column, but the columns are: {', '.join(map(str, names))}."
            + hint)


def fields_of(fmt: str, flag: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None]
    except ValueError as exc:
        raise DatasetError(f"{flag} {fmt!r} is not a valid format string ({exc}): write {{{{ for a literal brace.") from None


def _check_format_string(fmt: str, flag: str, columns: list[str]) -> None:
    names = fields_of(fmt, flag)
    if fmt.strip() and not names:
        raise DatasetError(f"{flag} {fmt!r} names no column: use {{column}}, e.g. {{{columns[0]}}}.")
    for name in names:
        if name in columns:
            continue
        if name == "":
            raise DatasetError(f"{flag} {fmt!r} has an empty {{}}: name a column, e.g. {{{columns[0]}}}.")
        lower = {str(c).lower(): c for c in columns}
        guess = lower.get(name.lower()) or next(iter(difflib.get_close_matches(name, list(map(str, columns)), n=1)), None)
        hint = f" Did you mean {{{guess}}}?" if guess else ""
        shown = flag.rstrip("=") if flag.endswith("=") else flag
        raise DatasetError(f"{shown} uses {{{name}}}, but the columns are: {', '.join(map(str, columns))}.{hint}")


def _render_field(frame: pd.DataFrame, fmt: str, flag: str, required: bool) -> list:
    """One value per row; a plain "{col}" keeps the cell (lists stay lists), else a formatted string."""
    names = fields_of(fmt, flag)
    keys = list(dict.fromkeys(names))
    sub = frame[keys]
    missing = sub.isna().any(axis=1) if len(sub.columns) else pd.Series(False, index=frame.index)
    if missing.any():
        if not required:
            sub = sub.fillna("")
        else:
            rows = [int(i) + 1 for i in missing[missing].index[:5]]
            cols = [c for c in keys if frame[c].isna().any()]
            raise DatasetError(
                f"{flag} {fmt!r}: row(s) {', '.join(map(str, rows))} have empty cells in {', '.join(cols)} "
                f"({int(missing.sum())} rows in all). Fill them or drop those rows (df.dropna())."
            )
    if fmt == "{" + (keys[0] if keys else "") + "}":
        column = sub[keys[0]]
        if column.dtype == object:
            return [_cell_text(v) for v in column.tolist()]
        return column.astype(str).tolist()
    records = sub.map(_cell_text).to_dict("records") if len(keys) else [{}] * len(frame)
    return [fmt.format_map(record) for record in records]


def _cell_text(value):
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):  # binary parquet columns: keep the text, flag bad bytes as U+FFFD
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (list, tuple, dict)) or hasattr(value, "tolist"):
        return value  # conversations stay structured
    return str(value)
