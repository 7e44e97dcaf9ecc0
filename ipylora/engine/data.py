"""From a table to training examples: format, template, tokens and the loss mask; splits.

A `LoraDataset` keeps the user's table and how to read it. The format (formats.py) turns each row
into messages, the template (templates.py) turns messages into spans of text that do or do not
carry loss, and `tokenize()` turns spans into `input_ids` and `labels`: untrained spans are -100,
trained spans and the EOS appended after each of them carry loss. The mask is built from token
positions (spans are tokenized separately), never by looking for token ids, so EOS is trained
even when pad == eos.

Rows are shuffled (seeded, on request), limited, and split into train and eval here; the
dataset object itself is the train split, `splits()["eval"]` the held-out rows.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from ipylora.engine import formats, preference
from ipylora.engine.preference import PREFERENCE_KIND, UNPAIRED_KIND
from ipylora.engine.prompts import PROMPT_KIND
from ipylora.engine.config import DataArgs
from ipylora.engine.errors import DatasetError
from ipylora.engine.templates import PLAIN, Template, get_template

IGNORE_INDEX = -100
EVAL_KEYS = ("eval", "validation", "valid", "test")


@dataclass
class LoraDataset:
    """A named table plus the mapping from its columns to conversations and text.

    `frame` is a DataFrame, or a dict of DataFrames by split ("train" and optionally "eval").
    """

    name: str
    frame: pd.DataFrame | dict
    args: DataArgs = field(default_factory=DataArgs)

    def __post_init__(self):
        train, held_out = _split(self.frame, self.args)
        self.frame = _clean_columns(train)
        self.mapping = formats.resolve(self.frame, self.args.format, self.args.columns,
                                       self.args.prompt, self.args.response)
        self.text_mode = self.mapping.text_mode
        self.kind: str = getattr(self.mapping.format, "kind", "sft")
        """"sft", "preference", "unpaired-preference" or "prompt": the shape training methods check (`require`)."""
        self.marker = self.args.response_after
        if self.marker is not None and not self.text_mode:
            raise DatasetError(f"--response-after splits rows of format text, but this data is "
                               f"{self.mapping.format.name}: drop --response-after (its answers are already marked).")
        if self.marker == "":
            raise DatasetError("--response-after needs the text that ends each prompt, e.g. --response-after \"[/INST]\".")
        self._spec: Template = PLAIN if self.text_mode else get_template(self.args.template)
        if self.marker:
            self._spec = _marker_template(self._texts(), self.marker)
        self.template: Template = self._spec
        self._conversations: list | None = None
        if self.mapping.format.name in ("messages", "sharegpt") and not any(
                m["role"] == "assistant" for conv in self.conversations() for m in conv):
            self.kind = PROMPT_KIND  # every row ends with a user turn: prompts to answer (GRPO)
        self._rows: list | None = None
        self._tokens: tuple | None = None  # (key, tokens) computed ahead of their use; see _reuse
        self._keep = False  # tokens_kept()
        self._hf: tuple | None = None  # (tokens, their datasets.Dataset), kept within tokens_kept (train._to_hf)
        self.truncation: Truncation | None = None
        self.eval: LoraDataset | None = None
        if held_out is not None:
            eval_args = replace(self.args, eval=None, eval_from=None, shuffle=False, limit=None)
            try:
                self.eval = LoraDataset(f"{self.name}:eval", held_out, eval_args)
                if self.marker and _shares_wrapping(self.eval._texts(), self.marker, self._spec):
                    # The eval rows are read with the train rows' wrapping (chat uses that one).
                    self.eval._spec = self.eval.template = self._spec
                self.eval.conversations()
            except DatasetError as exc:
                raise DatasetError(f"Eval data: {exc}") from None

    # -- what the rest of the engine reads ---------------------------------------------------
    @property
    def columns(self) -> list[str]:
        return list(self.frame.columns)

    @property
    def is_preference(self) -> bool:
        """Paired or unpaired preference data (DPO, SimPO, ORPO, KTO)."""
        return self.kind in (PREFERENCE_KIND, UNPAIRED_KIND)

    @property
    def prompt_format(self) -> str:
        return self.mapping.fields.get("prompt", self.mapping.fields.get("instruction", ""))

    @property
    def response_format(self) -> str:
        fields = self.mapping.fields
        return fields.get("completion") or fields.get("output") or fields.get("text") or next(iter(fields.values()))

    def __len__(self) -> int:
        """The rows SFT, chat and eval read: every row, except that unpaired preference data counts
        its desirable (label true) rows only; `len(frame)` counts them all."""
        if self.kind == UNPAIRED_KIND:
            return len(self.conversations())
        return len(self.frame)

    def splits(self) -> dict[str, LoraDataset]:
        """{"train": this dataset} plus "eval" when an eval split was asked for."""
        return {"train": self, **({"eval": self.eval} if self.eval is not None else {})}

    def conversations(self) -> list[list[dict]]:
        """Every row as messages (role, content); errors name the row."""
        if self._conversations is None:
            if self.marker:
                conversations = _marker_conversations(self._texts(), self.marker, self._spec)
            elif self.is_preference:  # the chosen / desirable answers
                conversations = preference.conversations(self.preference_rows())
            else:
                conversations = self.mapping.conversations(self.frame)
            responses = [m["content"] for conv in conversations for m in conv if m["role"] == "assistant"]
            if responses and not any(r.strip() for r in responses):
                where = self.mapping.fields.get("completion") or self.mapping.fields.get("output") or "the response"
                raise DatasetError(f"Every response is empty (rendered from {where}): map the response to a column "
                                   "that holds text, e.g. --columns response=COLUMN or --response \"{COLUMN}\".")
            self._conversations = conversations
        return self._conversations

    def _texts(self) -> list[str]:
        """The text column of a text-format dataset, one string per row."""
        return [m["content"] for conv in self.mapping.conversations(self.frame) for m in conv]

    def system_prompts(self) -> list[str]:
        """The system prompt of every row ("" for a row without one); several system turns are joined."""
        return ["\n\n".join(m["content"] for m in conv if m["role"] == "system") for conv in self.conversations()]

    def system_summary(self) -> dict:
        """What run.json records about system prompts: the shared one, or the most common and how many differ.

        `system` is what chat uses by default: the prompt every row shared, else the most common
        one among rows that have one (None when no row has one); `system_distinct` counts the
        different prompts ("" counts as one when some rows have none).
        """
        from collections import Counter

        counts = Counter(self.system_prompts())
        with_text = [(text, n) for text, n in counts.most_common() if text]
        return {"system": with_text[0][0] if with_text else None, "system_distinct": len(counts),
                "system_shared": len(counts) == 1 and bool(with_text)}

    def prompt_messages(self, row: int) -> list[dict]:
        """Row `row`'s conversation up to (not including) its last assistant turn: the prompt side as
        messages (system, earlier turns, the last user turn), which a template formats as training did."""
        conv = self.conversations()[row]
        last = max((i for i, m in enumerate(conv) if m["role"] == "assistant"), default=len(conv))
        return [dict(m) for m in conv[:last]]

    # -- preference data (preference.py) --------------------------------------------------------
    def require(self, kind: str, who: str = "This") -> None:
        """Refuse data of another shape in one line naming the columns and a mapping to try: `who`
        says what needs it ("--method dpo"). Paired data also serves unpaired methods (`unpaired_rows`),
        every dataset with prompts serves the prompt methods, and prompt-only data trains nothing by SFT."""
        if kind == PROMPT_KIND:
            return  # prompts.prompt_sides says when a dataset has none (whole texts)
        if kind == "sft" and self.kind == PROMPT_KIND:
            raise DatasetError(f"{who} needs answers to train on, but dataset {self.name!r} holds prompts only "
                               f"(columns {', '.join(map(str, self.columns))}): give it a response column, or train "
                               "it with --method grpo --reward FN.")
        if self.kind != kind and not (kind == UNPAIRED_KIND and self.kind == PREFERENCE_KIND) and kind != "sft":
            raise preference.kind_error(self.name, self.mapping, self.columns, kind, who)

    def preference_rows(self) -> list:
        """Every row as `preference.Preference` (paired data) or `preference.Unpaired` (unpaired)."""
        if self._rows is None:
            if not self.is_preference:
                raise preference.kind_error(self.name, self.mapping, self.columns, PREFERENCE_KIND)
            self._rows = self.mapping.rows(self.frame)
        return self._rows

    def unpaired_rows(self) -> list:
        """Rows as `preference.Unpaired`: unpaired data as is, each pair as a desirable chosen and an
        undesirable rejected row (as TRL's KTO reads paired data)."""
        self.require(UNPAIRED_KIND)
        rows = self.preference_rows()
        return preference.unpair(rows) if self.kind == PREFERENCE_KIND else rows

    def preference_tokens(self, tokenizer, max_length: int, rows=None) -> Tokens:
        """`prompt_ids`, `chosen_ids`, `rejected_ids` per kept row (TRL DPOTrainer's pre-tokenized keys;
        the answers exclude the prompt), from the template spans SFT uses: `prompt_ids + chosen_ids` is
        the SFT row of the chosen conversation. A row too long loses prompt tokens from the start (BOS
        kept) to fit beside its longer answer; a row whose longer answer alone does not fit is left out
        (`.truncation` counts both)."""
        self.require(PREFERENCE_KIND)
        return self._preference_tokens(PREFERENCE_KIND, self.preference_rows(), tokenizer, max_length, rows)

    def unpaired_tokens(self, tokenizer, max_length: int, rows=None) -> Tokens:
        """`prompt_ids`, `completion_ids`, `label` (bool) per kept row: TRL KTOTrainer's pre-tokenized
        keys; fitted to `max_length` like `preference_tokens`. Paired data gives two rows per pair."""
        return self._preference_tokens(UNPAIRED_KIND, self.unpaired_rows(), tokenizer, max_length, rows)

    def prompt_tokens(self, tokenizer, max_length: int, rows=None) -> Tokens:
        """`prompt_ids`, `_row`, `_prompt_text` per row: the prompts GRPO samples answers to (prompts.py)."""
        from ipylora.engine import prompts

        self.template = self._spec.resolve(tokenizer)
        if rows is None and (tokens := self._reuse(_token_key(tokenizer, max_length, PROMPT_KIND))) is not None:
            return tokens
        tokens = prompts.prompt_tokens(self, tokenizer, max_length, rows)
        if rows is None:
            self.truncation = tokens.truncation
            self._remember(_token_key(tokenizer, max_length, PROMPT_KIND), tokens)
        return tokens

    def _preference_tokens(self, shape: str, all_rows: list, tokenizer, max_length: int, rows) -> Tokens:
        self.template = self._spec.resolve(tokenizer)
        if rows is None and (tokens := self._reuse(_token_key(tokenizer, max_length, shape))) is not None:
            return tokens
        picked = all_rows if rows is None else [all_rows[i] for i in _indices(rows, len(all_rows))]
        build = preference.preference_tokens if shape == PREFERENCE_KIND else preference.unpaired_tokens
        tokens = build(picked, self.template, tokenizer, max_length)
        if rows is None:
            self.truncation = tokens.truncation
            self._remember(_token_key(tokenizer, max_length, shape), tokens)
        return tokens

    def segments(self, rows=None, template: Template | None = None) -> list[list[tuple[str, bool]]]:
        """[(text, trained), ...] per row."""
        template = template or self.template
        conversations = self.conversations()
        if rows is not None:
            conversations = [conversations[i] for i in _indices(rows, len(conversations))]
        return [template.segments(conv) for conv in conversations]

    def pairs(self) -> Sequence[tuple[str, str]]:
        """(everything before the last trained span, that span) per row.

        Every row is converted (so bad data fails here); the text is rendered when a row is read.
        A template that needs the tokenizer (`model`) shows the bare messages until `tokenize()`
        has resolved it against one.
        """
        self.conversations()
        return _Pairs(self, PLAIN if self.template.needs_tokenizer else self.template)

    def tokenize(self, tokenizer, max_length: int, rows=None) -> Tokens:
        """`input_ids` and `labels` per row, fitted into `max_length` tokens (`Tokens.truncation` says
        how: a row too long keeps its answer and EOS; one whose answer alone is too long is left out,
        so the lists can be shorter than the rows)."""
        self.template = self._spec.resolve(tokenizer)
        if rows is None and (tokens := self._reuse(_token_key(tokenizer, max_length, "sft"))) is not None:
            return tokens
        tokens = tokenize_segments(self.segments(rows), tokenizer, max_length, self.args.train_on_prompt)
        if rows is None:
            self.truncation = tokens.truncation  # what the last run's tokens lost (run.json records it)
            self._remember(_token_key(tokenizer, max_length, "sft"), tokens)
        return tokens

    def check_trainable(self, tokenizer, max_length: int, shape: str = "sft") -> dict[str, Truncation]:
        """Tokenize every split for a run and refuse one that would train on nothing.

        `shape` is what the method trains on: "sft" (`tokenize`), "preference" (`preference_tokens`)
        or "unpaired-preference" (`unpaired_tokens`). The train tokens are kept for the run's next call
        of that function (so they are computed once); returns the truncation report per split.
        """
        self.require(shape)
        build = {"sft": LoraDataset.tokenize, PREFERENCE_KIND: LoraDataset.preference_tokens,
                 UNPAIRED_KIND: LoraDataset.unpaired_tokens, PROMPT_KIND: LoraDataset.prompt_tokens}[shape]
        reports = {}
        for split, part in self.splits().items():
            tokens = build(part, tokenizer, max_length)
            report = tokens.truncation
            where = "" if split == "train" else f" of the {split} split"
            if shape == "sft" and part.kind == UNPAIRED_KIND and not report.rows:
                raise DatasetError(f"No row{where} of {self.name!r} is labelled true, so SFT has nothing to train on: "
                                   "label the desirable completions true, or train with an unpaired method (KTO).")
            if not next(iter(tokens.values())):
                answer = "answer + EOS" if shape == "sft" else "longer answer + EOS"
                raise DatasetError(
                    f"No row{where} of {self.name!r} fits --max-length {max_length} with its answer: every {answer} "
                    f"alone is longer (the shortest takes {report.shortest_response} tokens), so nothing would "
                    f"be trained. Raise --max-length to at least {report.shortest_response + 1}, or shorten the answers.")
            reports[split] = report
            if split == "train":
                part._tokens = (_token_key(tokenizer, max_length, shape), tokens)
        return reports

    @contextmanager
    def tokens_kept(self):
        """Within: every split keeps the tokens it last computed for the next run's use (a sweep's trials
        train on the same tokens; the tiny model's 6-trial sweep retokenized 0.05 s a trial). Outside,
        only `check_trainable`'s train tokens are kept, for one use: a large dataset's token lists
        are big, and a run's own copy is freed when it ends."""
        parts = list(self.splits().values())
        for part in parts:
            part._keep = True
        try:
            yield self
        finally:
            for part in parts:
                part._keep, part._tokens, part._hf = False, None, None

    def _reuse(self, key: tuple):
        """The tokens cached under `key` (the tokenizer, its length, max_length and shape), else None."""
        if self._tokens is None or self._tokens[0] != key:
            return None
        tokens = self._tokens[1]
        if not self._keep:
            self._tokens = None
        return tokens

    def _remember(self, key: tuple, tokens) -> None:
        if self._keep:
            self._tokens = (key, tokens)

    def describe(self) -> dict:
        """What the run records about its data (run.json); chat rebuilds its prompt from `template`."""
        return {
            "name": self.name,
            "rows": len(self.frame),
            "eval_rows": len(self.eval.frame) if self.eval is not None else 0,
            "columns": self.columns,
            "source": self.args.source,
            "format": self.mapping.format.name,
            "kind": self.kind,
            **self._label_counts(),
            "fields": dict(self.mapping.fields),
            "prompt": self.prompt_format,
            "response": self.response_format,
            "template": self.template.source,
            "template_name": self.template.name,
            "train_on_prompt": self.args.train_on_prompt,
            "response_after": self.args.response_after,
            **self.system_summary(),
            "shuffle": self.args.shuffle,
            "seed": self.args.seed,
            "limit": self.args.limit,
            "eval": self.args.eval,
            "eval_from": self.args.eval_from,
        }


    def _label_counts(self) -> dict:
        """Unpaired data: how many rows are desirable (label true) and how many not."""
        if self.kind != UNPAIRED_KIND:
            return {}
        desirable = sum(r.label for r in self.preference_rows())
        return {"desirable": desirable, "undesirable": len(self.frame) - desirable}


class _Pairs(Sequence):
    """The rows of `LoraDataset.pairs()`, rendered on access (100k rows render in ~1 s)."""

    def __init__(self, dataset: LoraDataset, template: Template):
        self._conversations, self._template = dataset.conversations(), template

    def __len__(self) -> int:
        return len(self._conversations)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        segs = self._template.segments(self._conversations[index])
        last = max((i for i, (_, trained) in enumerate(segs) if trained), default=len(segs))
        return "".join(t for t, _ in segs[:last]), "".join(t for t, _ in segs[last:])

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


def _token_key(tokenizer, max_length: int, shape: str) -> tuple:
    """What cached tokens were computed with: the tokenizer (and its length: --add-tokens grows it), max_length, shape."""
    return id(tokenizer), len(tokenizer), max_length, shape


class Tokens(dict):
    """Token lists per kept row (`input_ids` and `labels`; for preference data `prompt_ids`, `chosen_ids`,
    ... see preference.py), plus `truncation`: what fitting rows into max_length did."""

    truncation: Truncation


@dataclass
class Truncation:
    """How many rows `--max-length` changed, and how. Row numbers are 0-based positions in the input."""

    rows: int = 0
    max_length: int = 0
    cut_prompt: int = 0
    """Rows that kept their last response and EOS and lost prompt tokens from the start."""
    cut_end: int = 0
    """Rows trained whole (text without a marker, --train-on-prompt) cut at the end (they lose EOS)."""
    dropped: list[int] = field(default_factory=list)
    """Rows whose last response + EOS alone is longer than max_length: left out of training."""
    longest_response: int = 0
    """Tokens in the longest dropped answer + EOS (what --max-length would need to keep them all)."""
    shortest_response: int = 0
    """Tokens in the shortest dropped answer + EOS."""
    trained_tokens: int = 0
    """Tokens carrying loss in the kept rows."""

    @property
    def cut(self) -> int:
        return self.cut_prompt + self.cut_end

    def parts(self, answer: str = "answer", scale=lambda count: count, approx: str = "") -> list[str]:
        """What was cut, one phrase per kind of cut; `scale` extrapolates counts from a sample (`approx` "≈")."""
        out = []
        if self.cut_prompt:
            out.append(f"{approx}{scale(self.cut_prompt)} row(s) keep their {answer} + EOS and lose prompt tokens "
                       "from the start")
        if self.cut_end:
            out.append(f"{approx}{scale(self.cut_end)} fully trained row(s) are cut at the end (they lose their EOS)")
        if self.dropped:
            out.append(f"{approx}{scale(len(self.dropped))} row(s) are left out: their {answer} alone is longer "
                       f"(up to {self.longest_response} tokens with EOS)")
        return out

    def summary(self, answer: str = "answer") -> str:
        """One line for the preview and the run ("" when nothing was cut)."""
        parts = self.parts(answer)
        if not parts:
            return ""
        return (f"--max-length {self.max_length}: " + "; ".join(parts)
                + f" (of {self.rows} rows). Raise --max-length to keep more.")


def tokenize_segments(rows: list[list[tuple[str, bool]]], tokenizer, max_length: int,
                      train_on_prompt: bool = False) -> Tokens:
    """Tokenize every span (batched), join them, append EOS after each trained span, build labels,
    then fit each row into `max_length` (see `fit_row`)."""
    with gc_paused():
        bos = tokenizer.bos_token_id
        report = Truncation(rows=len(rows), max_length=max_length)
        out = Tokens(input_ids=[], labels=[])
        for row, (ids, labs) in enumerate(join_spans(rows, tokenizer, train_on_prompt)):
            head = int(bos is not None and bool(ids) and ids[0] == bos)
            fitted = fit_row(ids, labs, max_length, head, report, row)
            if fitted is not None:
                out["input_ids"].append(fitted[0])
                out["labels"].append(fitted[1])
                report.trained_tokens += sum(label != IGNORE_INDEX for label in fitted[1])
        out.truncation = report
        return out


@contextmanager
def gc_paused():
    """The cyclic GC rescans the millions of fresh lists tokenizing builds without ever finding a
    cycle: pausing it measured 188 -> 148 CPU-us per alpaca row (bench/prepare_data.py)."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def join_spans(rows: list[list[tuple[str, bool]]], tokenizer, train_on_prompt: bool = False,
               bos: bool = True) -> Iterator[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row of spans, untruncated, one row at a time: each span tokenized on its
    own, the first with the tokenizer's special tokens (its BOS) unless `bos` is False, the others
    without; EOS after each trained span; untrained spans labelled -100 (unless `train_on_prompt`)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DatasetError("The tokenizer has no EOS token, so the model could never learn to stop: set one.")
    firsts = [segs[0][0] for segs in rows]
    rest = [text for segs in rows for text, _ in segs[1:]]
    # Two batched calls: the first span gets the tokenizer's BOS, the others nothing.
    first_ids = tokenizer(firsts, add_special_tokens=bos)["input_ids"] if rows else []
    rest_ids = tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else []
    k = 0
    for segs, ids in zip(rows, first_ids):
        ids = list(ids)
        labs = list(ids) if train_on_prompt or segs[0][1] else [IGNORE_INDEX] * len(ids)
        for _, trained in segs[1:]:
            piece = rest_ids[k]
            k += 1
            ids += piece
            if trained:
                labs += piece
                if not piece or piece[-1] != eos:
                    ids.append(eos)
                    labs.append(eos)
            else:
                labs += piece if train_on_prompt else [IGNORE_INDEX] * len(piece)
        yield ids, labs


def fit_row(ids: list[int], labels: list[int], max_length: int, head: int, report: Truncation, row: int):
    """A row within `max_length` tokens that still ends with its answer and EOS, or None (dropped).

    Cutting the end (the usual truncation) removes exactly what a prompt/answer row is trained on:
    with a long system prompt every answer can be cut away and the run "trains" on nothing. So the
    last trained span (the answer + EOS) is kept whole and the prompt loses tokens from its start
    (the BOS stays); a row trained whole (no prompt) is cut at the end as before; a row whose
    answer alone does not fit is left out, and counted.
    """
    if len(ids) <= max_length:
        return ids, labels
    start = len(labels)  # where the last trained span (the answer + EOS) begins
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    if start <= head:  # trained whole (text without a marker, --train-on-prompt): no prompt to cut
        report.cut_end += 1
        return ids[:max_length], labels[:max_length]
    tail = len(ids) - start
    if head + tail <= max_length:
        report.cut_prompt += 1
        keep = max_length - head
        return ids[:head] + ids[-keep:], labels[:head] + labels[-keep:]
    report.dropped.append(row)
    report.longest_response = max(report.longest_response, tail)
    report.shortest_response = min(report.shortest_response or tail, tail)
    return None


def tokenize_pairs(pairs, tokenizer, max_length: int, train_on_prompt: bool = False) -> dict[str, list]:
    """(prompt side, response side) pairs -> tokens; the response and EOS carry loss."""
    return tokenize_segments([[(p, False), (r, True)] for p, r in pairs], tokenizer, max_length, train_on_prompt)


def _marker_template(texts: list[str], marker: str) -> Template:
    """The prompt wrapping of text rows split at `marker`: what every row's prompt starts with (cut
    back to a word boundary), then the user's text, then the marker. `%lora_chat TEXT` on an adapter
    trained on `<s>[INST] ... [/INST] ...` rows then sends `<s>[INST] TEXT [/INST]`."""
    import os
    import re

    from ipylora.engine.templates import FormatTemplate

    missing = [i + 1 for i, text in enumerate(texts) if marker not in text]
    if missing:
        raise DatasetError(f"--response-after {marker!r}: {len(missing)} of {len(texts)} row(s) do not contain it "
                           f"(e.g. row {missing[0]}): fix those rows, drop them, or use the marker every row has.")
    prompts = [text[:text.index(marker)] for text in texts]
    prefix = os.path.commonprefix(prompts) if len(prompts) > 1 else ""
    # Back to the end of the last punctuation (and the space after it): "<s>[INST] What is" -> "<s>[INST] ",
    # so a first word many prompts happen to share stays the user's.
    mark = max((m.end() for m in re.finditer(r"[^\w\s]\s*", prefix)), default=0)
    prefix = prefix[:mark]
    # The space every prompt ends with before the marker belongs to the wrapping, not to the user.
    ends = [p[len(prefix):] for p in prompts]
    space = os.path.commonprefix([e[::-1] for e in ends])[::-1] if len(ends) > 1 else ""
    space = space[len(space.rstrip()):]
    marker = space + marker
    if "{" in prefix + marker or "}" in prefix + marker:  # not expressible as a {prompt} template
        prefix, marker = "", ""
    return FormatTemplate("text", prefix + "{prompt}" + marker + "{response}")


def _marker_conversations(texts: list[str], marker: str, template: Template) -> list[list[dict]]:
    """Each text row as (user: the text between the template's prefix and the marker, assistant: the rest).
    The template's prefix + user + marker is the row's own text up to and including the marker."""
    prefix, wrap_marker = _marker_wrapping(template)
    out = []
    for text in texts:
        at = text.index(marker)
        prompt_side, answer = text[:at + len(marker)], text[at + len(marker):]
        user = prompt_side[len(prefix):len(prompt_side) - len(wrap_marker)] if prompt_side.endswith(wrap_marker) \
            else prompt_side[len(prefix):]
        out.append([{"role": "user", "content": user}, {"role": "assistant", "content": answer}])
    return out


def _marker_wrapping(template: Template) -> tuple[str, str]:
    """(prefix, marker) of a template made by `_marker_template`."""
    before, after = template.source.split("{prompt}")
    return before, after.split("{response}")[0]


def _shares_wrapping(texts: list[str], marker: str, template: Template) -> bool:
    prefix, wrap_marker = _marker_wrapping(template)
    return all(text.startswith(prefix) and text[:text.index(marker) + len(marker)].endswith(wrap_marker)
               and text.index(marker) >= len(prefix) for text in texts)


def _indices(rows, n: int) -> list[int]:
    if isinstance(rows, slice):
        return list(range(n))[rows]
    return list(rows)


def _clean_columns(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.reset_index(drop=True)
    frame.columns = [str(c) for c in frame.columns]
    return frame


def _split(frame, args: DataArgs) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(train rows, eval rows or None) after shuffle and limit."""
    held_out = None
    if isinstance(frame, dict):
        if "train" not in frame and len(frame) != 1:
            raise DatasetError(f"The data has splits {', '.join(frame)} but no 'train': pick one, e.g. "
                               f"--from NAME[{next(iter(frame))}].")
        train = frame.get("train", next(iter(frame.values())))
        held_out = frame.get("eval")
    else:
        train = frame
    if not isinstance(train, pd.DataFrame):
        raise DatasetError(f"A dataset needs a pandas DataFrame, got {type(train).__name__}.")
    if train.empty:
        raise DatasetError("The data has no rows: add at least one.")
    if held_out is not None and args.eval is not None:
        raise DatasetError("Pass either --eval SHARE or --eval-from SOURCE, not both.")
    rng = np.random.default_rng(args.seed)
    if args.shuffle:
        train = train.iloc[rng.permutation(len(train))]
    if args.limit is not None:
        if args.limit < 1:
            raise DatasetError(f"--limit {args.limit} must be at least 1.")
        train = train.iloc[: args.limit]
    if args.eval is not None:
        n = len(train)
        count = int(args.eval) if args.eval >= 1 else int(round(n * args.eval))
        if args.eval <= 0 or (args.eval >= 1 and args.eval != int(args.eval)):
            raise DatasetError(f"--eval {args.eval:g} must be a share in (0, 1) or a whole number of rows.")
        count = max(1, count)
        if count >= n:
            raise DatasetError(f"--eval {args.eval:g} would hold out {count} of {n} rows, leaving none to train on: "
                               "use a smaller share.")
        chosen = np.zeros(n, dtype=bool)
        chosen[np.random.default_rng(args.seed + 1).permutation(n)[:count]] = True
        held_out, train = train[chosen], train[~chosen]
    return train, (_clean_columns(held_out) if held_out is not None else None)
