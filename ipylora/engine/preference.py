"""Preference data: paired rows (prompt, chosen, rejected) for DPO, SimPO and ORPO, unpaired rows
(prompt, completion, label) for KTO, and the trainers' tokens built from them.

Two formats, registered in `ipylora.formats` like the others: `preference` reads text answers with
a prompt column, or TRL's conversational preference format (chosen/rejected as message lists; the
prompt a message list too, or implicit as the leading messages chosen and rejected share, the
convention of `trl.extract_prompt`); `unpaired-preference` reads a prompt, a completion (text or
messages) and a label that says whether the completion is desirable.

Tokens come from the same template spans as SFT: the prompt side is `Template.prompt_segments`
of the prompt messages (system and user turns through the dataset's --template), each answer is
the spans that follow them in `segments(prompt + answer)`, and both are tokenized by
`data.join_spans` as an SFT row is (answer text + the template's trained end-of-turn text, no
special tokens, then EOS). So `prompt_ids + chosen_ids` is the SFT row of the chosen conversation
token for token, and a DPO run on top of an SFT adapter sees the prompt tokens it was trained with.
The completions never include the prompt (TRL's pre-tokenized `prompt_ids`/`chosen_ids`/...).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass

from ipylora.engine import data  # data.py imports this module: use its names at call time
from ipylora.engine.errors import DatasetError
from ipylora.engine.formats import ROLES, Format, Messages

PREFERENCE_KIND = "preference"
UNPAIRED_KIND = "unpaired-preference"
TRUE = {"true", "1", "1.0"}
FALSE = {"false", "0", "0.0"}


@dataclass(frozen=True)
class Preference:
    """One paired row: the prompt side as messages, and the two answers as assistant turns."""

    prompt: Messages
    chosen: Messages
    rejected: Messages


@dataclass(frozen=True)
class Unpaired:
    """One unpaired row: the prompt side, the completion, and whether it is desirable."""

    prompt: Messages
    completion: Messages
    label: bool


# -- reading rows --------------------------------------------------------------------------------
def _messages(cell, row: int, field: str) -> Messages | None:
    """The cell as messages when it holds a list of {role, content} (or its JSON text), else None: text."""
    if isinstance(cell, str):
        if not cell.lstrip().startswith("["):
            return None
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError:
            return None  # text that happens to start with "["
        if not (isinstance(cell, list) and cell and all(isinstance(m, dict) for m in cell)):
            return None
    if hasattr(cell, "tolist"):  # numpy arrays from parquet / arrow
        cell = cell.tolist()
    if not isinstance(cell, (list, tuple)):
        return None
    if not cell:
        raise DatasetError(f"Row {row} of {field!r} is an empty list of messages: give it the answer's turn.")
    out = []
    for number, turn in enumerate(cell, start=1):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            keys = ", ".join(map(str, turn)) if isinstance(turn, dict) else type(turn).__name__
            raise DatasetError(f"Row {row}, message {number} of {field!r} has {keys}, not 'role' and 'content': "
                               "store messages as {role, content} objects.")
        role = ROLES.get(str(turn["role"]).lower())
        if role is None:
            raise DatasetError(f"Row {row}, message {number} of {field!r} has role {turn['role']!r}: use one of "
                               f"{', '.join(ROLES)}.")
        out.append({"role": role, "content": "" if turn["content"] is None else str(turn["content"])})
    return out


def _prompt(cell, row: int) -> Messages:
    messages = _messages(cell, row, "prompt")
    return messages if messages is not None else [{"role": "user", "content": cell}]


def _answer(cell, row: int, field: str) -> Messages:
    messages = _messages(cell, row, field)
    messages = messages if messages is not None else [{"role": "assistant", "content": cell}]
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"Row {row} of {field!r} has no assistant turn, so there is no answer to score: "
                           "add one or drop the row.")
    return messages


def _with_system(prompt: Messages, system: str) -> Messages:
    if not system or not system.strip() or (prompt and prompt[0]["role"] == "system"):
        return prompt
    return [{"role": "system", "content": system}, *prompt]


def _split_shared(chosen: Messages, rejected: Messages, row: int) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen answer, rejected answer) of two conversations whose shared leading messages
    are the prompt (trl.extract_prompt); identical conversations keep their last assistant turn."""
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in conv):
            raise DatasetError(f"Row {row} of {name!r} has no assistant turn: add the answer or drop the row.")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    last = min(max(i for i, m in enumerate(c) if m["role"] == "assistant") for c in (chosen, rejected))
    shared = min(shared, last)
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[shared]["role"] != "assistant":
            raise DatasetError(
                f"Row {row}: chosen and rejected differ at message {shared + 1}, a {conv[shared]['role']} turn of "
                f"{name}: a pair answers one prompt, so they may differ only from an assistant turn on.")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def preference_rows(values: dict[str, list]) -> list[Preference]:
    """Field values (chosen, rejected, optional prompt and system) -> one `Preference` per row."""
    n = len(values["chosen"])
    prompts = values.get("prompt") or [None] * n
    systems = values.get("system") or [""] * n
    out = []
    for row, (prompt, chosen, rejected, system) in enumerate(
            zip(prompts, values["chosen"], values["rejected"], systems), start=1):
        chosen_m, rejected_m = _messages(chosen, row, "chosen"), _messages(rejected, row, "rejected")
        if (chosen_m is None) != (rejected_m is None):
            raise DatasetError(f"Row {row}: one of chosen and rejected is a list of messages, the other text: "
                               "store both the same way.")
        if chosen_m is not None and (chosen_m[0]["role"] != "assistant" or rejected_m[0]["role"] != "assistant"):
            # The prompt is inside the conversations (a prompt column beside it is ignored, as TRL does).
            prompt_m, chosen_m, rejected_m = _split_shared(chosen_m, rejected_m, row)
        elif prompt is None:
            raise DatasetError(
                f"Row {row}: chosen and rejected hold only the answers and there is no prompt column: map one "
                "with --columns prompt=COLUMN, or store chosen and rejected as message lists that start with "
                "the prompt's turns.")
        else:
            prompt_m = _prompt(prompt, row)
        chosen_m = chosen_m if chosen_m is not None else _answer(chosen, row, "chosen")
        rejected_m = rejected_m if rejected_m is not None else _answer(rejected, row, "rejected")
        for name, answer in (("chosen", chosen_m), ("rejected", rejected_m)):
            if not any(m["role"] == "assistant" for m in answer):
                raise DatasetError(f"Row {row} of {name!r} has no assistant turn: add the answer or drop the row.")
        out.append(Preference(_with_system(prompt_m, system), chosen_m, rejected_m))
    return out


def parse_label(value, row: int) -> bool:
    """True/False from a bool, "true"/"false" (any case) or 1/0; else a one-line error naming the row."""
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise DatasetError(f"Row {row}: label {value!r} is not true or false: the label says whether the completion "
                       "is desirable (true/false or 1/0). If this column is not such a label, pass --format "
                       "prompt-completion.")


def unpaired_rows(values: dict[str, list]) -> list[Unpaired]:
    """Field values (prompt, completion, label, optional system) -> one `Unpaired` per row."""
    n = len(values["prompt"])
    systems = values.get("system") or [""] * n
    return [Unpaired(_with_system(_prompt(prompt, row), system), _answer(completion, row, "completion"),
                     parse_label(label, row))
            for row, (prompt, completion, label, system)
            in enumerate(zip(values["prompt"], values["completion"], values["label"], systems), start=1)]


def unpair(rows: list[Preference]) -> list[Unpaired]:
    """Paired rows as unpaired ones (chosen: desirable, rejected: not), as TRL's KTO reads paired data."""
    return [u for r in rows for u in (Unpaired(r.prompt, r.chosen, True), Unpaired(r.prompt, r.rejected, False))]


def conversations(rows: list) -> list[Messages]:
    """What SFT, chat and eval read: the chosen answer of each pair, the desirable completions."""
    if rows and isinstance(rows[0], Unpaired):
        return [r.prompt + r.completion for r in rows if r.label]
    return [r.prompt + r.chosen for r in rows]


def _build_preference(values):
    return conversations(preference_rows(values))


def _build_unpaired(values):
    return conversations(unpaired_rows(values))


PROMPT_COLUMNS = ("prompt", "question", "query", "instruction")
PREFERENCE = Format(
    "preference", ("chosen", "rejected"), ("prompt", "system"),
    columns={"prompt": PROMPT_COLUMNS, "chosen": ("chosen",), "rejected": ("rejected",), "system": ("system",)},
    build=_build_preference, aliases=("paired-preference", "pairwise"), kind=PREFERENCE_KIND, rows=preference_rows,
)
UNPAIRED_PREFERENCE = Format(
    "unpaired-preference", ("prompt", "completion", "label"), ("system",),
    columns={"prompt": PROMPT_COLUMNS, "completion": ("completion", "response", "answer"), "label": ("label",),
             "system": ("system",)},
    build=_build_unpaired, aliases=("unpaired",), kind=UNPAIRED_KIND, rows=unpaired_rows,
)
KIND_FIELDS = {PREFERENCE_KIND: ("prompt", "chosen", "rejected"), UNPAIRED_KIND: ("prompt", "completion", "label")}


def kind_error(name: str, mapping, columns: list[str], kind: str, who: str = "This") -> DatasetError:
    """The one-line error for data of the wrong shape: the columns there are, and a mapping to try
    (a column named like the field, the column the current format reads for it, a close name)."""
    fmt = PREFERENCE if kind == PREFERENCE_KIND else UNPAIRED_PREFERENCE
    guesses = []
    for field_name in KIND_FIELDS[kind]:
        current = mapping.fields.get(field_name, "").strip("{}")
        match = (next((c for c in fmt.columns.get(field_name, ()) if c in columns), None)
                 or (current if current in columns else None)
                 or next(iter(difflib.get_close_matches(field_name, columns, n=1, cutoff=0.6)), None))
        guesses.append(f"{field_name}={match or field_name.upper()}")
    return DatasetError(
        f"{who} needs {kind} data ({', '.join(KIND_FIELDS[kind])}), but dataset {name!r} is format "
        f"{mapping.format.name} with columns {', '.join(columns)}: redefine it with %%lora_dataset {name} "
        f"--format {kind} --columns {','.join(guesses)}.")


# -- tokens --------------------------------------------------------------------------------------
def split_segments(template, prompt: Messages, answers: list[Messages]):
    """(prompt spans, [spans of each answer]): the answer spans are what follows the prompt's spans in
    `template.segments(prompt + answer)`, which SFT tokenizes."""
    prompt_segs = template.prompt_segments(prompt) or [("", False)]
    out = []
    for answer in answers:
        segs = template.segments(prompt + answer)
        if segs[:len(prompt_segs)] != prompt_segs:
            raise DatasetError(f"The {template.name} template writes the prompt differently when an answer follows, "
                               "so prompt and answer tokens cannot be told apart: use --template chatml or "
                               "human-assistant.")
        out.append(segs[len(prompt_segs):])
    return prompt_segs, out


def fit_prompt(prompt: list[int], answer: int, max_length: int, head: int, report: data.Truncation, row: int):
    """The prompt ids to keep so that prompt + an answer of `answer` tokens fits `max_length`, or None.

    As for SFT rows (data.fit_row): the answer is never cut; the prompt loses tokens from its start
    (the BOS stays); a row whose answer alone does not fit is left out, and counted."""
    if len(prompt) + answer <= max_length:
        return prompt
    if head + answer <= max_length:
        report.cut_prompt += 1
        keep = max_length - head - answer
        return prompt[:head] + prompt[len(prompt) - keep:]
    report.dropped.append(row)
    report.longest_response = max(report.longest_response, answer)
    report.shortest_response = min(report.shortest_response or answer, answer)
    return None


def _ids(segment_rows, tokenizer, bos: bool) -> list[list[int]]:
    """Token ids per row of spans; answers (bos=False) start after an empty untrained span, so every
    trained span, the first included, is followed by EOS exactly as in an SFT row."""
    rows = segment_rows if bos else [[("", False), *segs] for segs in segment_rows]
    return [ids for ids, _ in data.join_spans(rows, tokenizer, bos=bos)]


def _tokenize(prompts, answers, tokenizer, max_length: int) -> tuple[list, list, data.Truncation]:
    """Prompt ids fitted to max_length beside the longest answer of each row (None: dropped), answer ids
    per row, and the truncation report."""
    prompt_ids = _ids(prompts, tokenizer, bos=True)
    width = len(answers[0]) if answers else 0
    columns = [_ids([a[k] for a in answers], tokenizer, bos=False) for k in range(width)]
    answer_ids = [list(row) for row in zip(*columns)]
    bos = tokenizer.bos_token_id
    report = data.Truncation(rows=len(prompts), max_length=max_length)
    fitted = []
    for row, (ids, ans) in enumerate(zip(prompt_ids, answer_ids)):
        head = int(bos is not None and bool(ids) and ids[0] == bos)
        kept = fit_prompt(ids, max(map(len, ans)), max_length, head, report, row)
        if kept is not None:
            report.trained_tokens += sum(map(len, ans))
        fitted.append(kept)
    return fitted, answer_ids, report


def preference_tokens(rows: list[Preference], template, tokenizer, max_length: int) -> data.Tokens:
    """`prompt_ids`, `chosen_ids`, `rejected_ids` per kept row (TRL DPOTrainer's pre-tokenized keys;
    the completions exclude the prompt), with `.truncation`."""
    with data.gc_paused():
        split = [split_segments(template, r.prompt, [r.chosen, r.rejected]) for r in rows]
        prompts, answers = [p for p, _ in split], [a for _, a in split]
        fitted, answer_ids, report = _tokenize(prompts, answers, tokenizer, max_length)
        out = data.Tokens(prompt_ids=[], chosen_ids=[], rejected_ids=[])
        for prompt, (chosen, rejected) in zip(fitted, answer_ids):
            if prompt is not None:
                out["prompt_ids"].append(prompt)
                out["chosen_ids"].append(chosen)
                out["rejected_ids"].append(rejected)
    out.truncation = report
    return out


def unpaired_tokens(rows: list[Unpaired], template, tokenizer, max_length: int) -> data.Tokens:
    """`prompt_ids`, `completion_ids`, `label` (bool) per kept row: TRL KTOTrainer's pre-tokenized keys."""
    with data.gc_paused():
        split = [split_segments(template, r.prompt, [r.completion]) for r in rows]
        prompts, answers = [p for p, _ in split], [a for _, a in split]
        fitted, answer_ids, report = _tokenize(prompts, answers, tokenizer, max_length)
        out = data.Tokens(prompt_ids=[], completion_ids=[], label=[])
        for prompt, (completion,), r in zip(fitted, answer_ids, rows):
            if prompt is not None:
                out["prompt_ids"].append(prompt)
                out["completion_ids"].append(completion)
                out["label"].append(r.label)
    out.truncation = report
    return out
