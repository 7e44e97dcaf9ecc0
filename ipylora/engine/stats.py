"""What the dataset preview shows, computed without IPython: samples as loss spans, token lengths,
truncation, and warnings about rows that would train badly.

Token lengths of a large dataset are measured on a seeded random sample (`sample_size` rows)
and the truncated count is extrapolated and labelled as an estimate: tokenizing 100k alpaca rows
takes ~10 s on 2 cores, the preview must appear in under 3 s. Warnings that need no tokenizer
(empty responses, duplicates, non-UTF-8 text) are counted on every row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ipylora.engine.data import IGNORE_INDEX, LoraDataset, Truncation, fit_row

BAD_TEXT = re.compile("[\ufffd\ud800-\udfff]")


@dataclass
class DatasetStats:
    """Numbers and samples for one preview."""

    rows: int
    eval_rows: int
    tokenizer: str
    max_length: int
    samples: list[list[tuple[str, bool]]]
    """Rendered samples as runs of (decoded text, carries loss)."""
    truncated_samples: list[str]
    """Per sample: "" (fits), "start" (prompt tokens cut from the start), "end" (cut at the end) or
    "dropped" (the answer alone is too long: left out of training)."""
    lengths: list[int]
    """Token lengths of the measured rows."""
    measured: int
    """How many rows were tokenized (all, or a seeded sample)."""
    over: int
    """Rows over max_length (extrapolated when measured < rows)."""
    truncation: Truncation = field(default_factory=Truncation)
    """What fitting the measured rows into max_length does (counts of the measured rows)."""
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Things to know that are not problems (how a text dataset is trained)."""

    @property
    def estimated(self) -> bool:
        return self.measured < self.rows

    @property
    def over_share(self) -> float:
        return self.over / self.rows if self.rows else 0.0


def dataset_stats(dataset: LoraDataset, tokenizer, tokenizer_name: str, max_length: int, samples: int = 3,
                  sample_size: int = 1000, seed: int = 0) -> DatasetStats:
    if dataset.is_preference:
        return preference_stats(dataset, tokenizer, tokenizer_name, max_length, samples, sample_size, seed)
    n = len(dataset)
    shown = list(range(min(samples, n)))
    measured = list(range(n)) if n <= sample_size else sorted(np.random.default_rng(seed).choice(n, sample_size, replace=False).tolist())
    wanted = sorted(set(shown) | set(measured))
    tokens = dataset.tokenize(tokenizer, max_length=10**9, rows=wanted)
    position = {row: i for i, row in enumerate(wanted)}
    lengths = [len(tokens["input_ids"][position[r]]) for r in measured]
    over_measured = sum(length > max_length for length in lengths)
    over = over_measured if len(measured) == n else round(over_measured * n / len(measured))
    head = tokenizer.bos_token_id
    truncation = Truncation(rows=len(measured), max_length=max_length)
    for r in measured:
        ids, labels = tokens["input_ids"][position[r]], tokens["labels"][position[r]]
        fit_row(ids, labels, max_length, int(bool(ids) and ids[0] == head), truncation, r)
    runs, cut = [], []
    for row in shown:
        ids, labels = tokens["input_ids"][position[row]], tokens["labels"][position[row]]
        one = Truncation()
        fitted = fit_row(ids, labels, max_length, int(bool(ids) and ids[0] == head), one, row)
        runs.append(_runs(tokenizer, *(fitted or (ids, labels))))
        cut.append("start" if one.cut_prompt else "end" if one.cut_end else "dropped" if one.dropped else "")
    stats = DatasetStats(rows=n, eval_rows=len(dataset.eval) if dataset.eval is not None else 0,
                         tokenizer=tokenizer_name, max_length=max_length, samples=runs, truncated_samples=cut,
                         lengths=lengths, measured=len(measured), over=over, truncation=truncation)
    stats.warnings = _warnings(dataset, stats)
    stats.notes = _notes(dataset)
    return stats


# Where the answer starts in common text layouts (for the --response-after hint).
MARKERS = ("[/INST]", "<|im_start|>assistant\n", "### Assistant:", "### Response:", "<|assistant|>",
           "<start_of_turn>model\n", "Assistant:")


def _notes(dataset: LoraDataset) -> list[str]:
    if not dataset.text_mode:
        return []
    if dataset.marker:
        return [f"text rows are split at {dataset.marker!r}: what follows it is trained (green), the rest is the "
                f"prompt; chat wraps your text as {dataset.template.prompt_text('TEXT')!r}."]
    texts = dataset._texts()[:200]
    found = next((m for m in MARKERS if all(m in text for text in texts)), None)
    hint = (f" Every row contains {found!r}: --response-after {found!r} trains only what follows it."
            if found else " To train only the answers, pass --response-after MARKER (the text that ends each prompt).")
    return ["format text: the whole text of every row is trained, prompt included, and chat/eval cannot tell "
            "prompt from answer." + hint]


def _warnings(dataset: LoraDataset, stats: DatasetStats) -> list[str]:
    out = []
    conversations = dataset.conversations()
    empty = [i + 1 for i, conv in enumerate(conversations)
             if not all(m["content"].strip() for m in conv if m["role"] == "assistant")] \
        if any(not m["content"].strip() for conv in conversations for m in conv) else []
    if empty:
        out.append(f"{len(empty)} row(s) have an empty response (e.g. row {empty[0]}): they teach the model to "
                   "answer nothing; drop them.")
    texts = ["\x00".join([m["content"] for m in conv]) for conv in conversations]
    return out + _table_warnings(dataset, stats, texts)


def _table_warnings(dataset: LoraDataset, stats: DatasetStats, texts: list[str]) -> list[str]:
    """Warnings every kind of data shares: duplicate rows, rows over --max-length, text that was not UTF-8."""
    out = []
    frame = dataset.frame
    try:
        duplicated = frame.duplicated()
    except TypeError:  # unhashable cells (lists of messages)
        duplicated = frame.astype(str).duplicated()
    if duplicated.any():
        first = int(np.flatnonzero(duplicated.to_numpy())[0]) + 1
        out.append(f"{int(duplicated.sum())} duplicate row(s) (e.g. row {first}): they weigh those examples more; "
                   "drop them with df.drop_duplicates().")
    if stats.over:
        t = stats.truncation
        scale = (lambda k: round(k * stats.rows / stats.measured)) if stats.estimated else (lambda k: k)
        approx = "≈" if stats.estimated else ""
        answer = "answer" if dataset.kind == "sft" else "answers"
        how = t.parts(answer, scale, approx)
        out.append(f"{approx}{stats.over} row(s) ({stats.over_share:.1%}) are longer than --max-length "
                   f"{stats.max_length} tokens: " + "; ".join(how) + ". Raise --max-length or shorten them.")
    if BAD_TEXT.search("".join(texts)):  # one scan over all text; rows are located only when needed
        bad = [i + 1 for i, text in enumerate(texts) if BAD_TEXT.search(text)]
        out.append(f"{len(bad)} row(s) contain text that was not valid UTF-8 (U+FFFD or lone surrogates, e.g. "
                   f"row {bad[0]}): re-read the source with its real encoding.")
    return out


# -- preference data -----------------------------------------------------------------------------
@dataclass
class PreferenceSample:
    """One preference row as the preview shows it."""

    row: int
    prompt: str
    """The prompt tokens training sees, decoded (after truncation)."""
    prompt_tokens: int
    answers: list[tuple[str, str, int]]
    """(title, decoded answer tokens, token count): chosen and rejected, or the completion."""
    cut: str = ""
    """"" (fits), "start" (prompt tokens cut from the start) or "dropped" (the answers alone are too long)."""


@dataclass
class PreferenceStats(DatasetStats):
    """The preview's numbers for paired or unpaired preference data; `lengths` are prompt + the longer answer."""

    kind: str = "preference"
    pairs: list[PreferenceSample] = field(default_factory=list)
    part_lengths: dict[str, list[int]] = field(default_factory=dict)
    """Token lengths of each part (prompt, chosen, rejected or completion) of the measured rows."""


def preference_stats(dataset: LoraDataset, tokenizer, tokenizer_name: str, max_length: int, samples: int = 3,
                     sample_size: int = 1000, seed: int = 0) -> PreferenceStats:
    """Token lengths, truncation and warnings of preference data, measured as `dataset_stats` does."""
    from ipylora.engine.preference import PREFERENCE_KIND, fit_prompt

    paired = dataset.kind == PREFERENCE_KIND
    rows = dataset.preference_rows()
    n = len(rows)
    shown = list(range(min(samples, n)))
    measured = list(range(n)) if n <= sample_size else sorted(np.random.default_rng(seed).choice(n, sample_size, replace=False).tolist())
    wanted = sorted(set(shown) | set(measured))
    build = dataset.preference_tokens if paired else dataset.unpaired_tokens
    tokens = build(tokenizer, max_length=10**9, rows=wanted)
    keys = ("chosen_ids", "rejected_ids") if paired else ("completion_ids",)
    position = {row: i for i, row in enumerate(wanted)}
    parts = {"prompt": "prompt_ids", **{k[:-4]: k for k in keys}}
    part_lengths = {name: [len(tokens[key][position[r]]) for r in measured] for name, key in parts.items()}
    longer = [max(len(tokens[k][position[r]]) for k in keys) for r in measured]
    lengths = [p + a for p, a in zip(part_lengths["prompt"], longer)]
    over_measured = sum(length > max_length for length in lengths)
    over = over_measured if len(measured) == n else round(over_measured * n / len(measured))
    bos = tokenizer.bos_token_id
    truncation = Truncation(rows=len(measured), max_length=max_length)
    pairs, measured_rows = [], set(measured)
    for r in wanted:
        prompt = tokens["prompt_ids"][position[r]]
        answers = [tokens[k][position[r]] for k in keys]
        head = int(bos is not None and bool(prompt) and prompt[0] == bos)
        one = Truncation()
        kept = fit_prompt(prompt, max(map(len, answers)), max_length, head, one, r)
        if r in measured_rows:
            fit_prompt(prompt, max(map(len, answers)), max_length, head, truncation, r)
        if r in shown:
            titles = ("chosen", "rejected") if paired else (f"completion (label {str(rows[r].label).lower()})",)
            pairs.append(PreferenceSample(r, tokenizer.decode(kept if kept is not None else prompt), len(prompt),
                                          [(t, tokenizer.decode(ids), len(ids)) for t, ids in zip(titles, answers)],
                                          "start" if one.cut_prompt else "dropped" if one.dropped else ""))
    stats = PreferenceStats(rows=n, eval_rows=len(dataset.eval.frame) if dataset.eval is not None else 0,
                            tokenizer=tokenizer_name, max_length=max_length, samples=[],
                            truncated_samples=[p.cut for p in pairs], lengths=lengths, measured=len(measured),
                            over=over, truncation=truncation, kind=dataset.kind, pairs=pairs,
                            part_lengths=part_lengths)
    stats.warnings = _preference_warnings(dataset, rows, stats)
    return stats


def _preference_warnings(dataset: LoraDataset, rows: list, stats: PreferenceStats) -> list[str]:
    """Pairs that teach nothing (chosen == rejected), empty answers or prompts, a single KTO label."""
    out = []

    def blank(messages, role="assistant"):
        return not any(m["content"].strip() for m in messages if m["role"] == role)

    def first(found):
        return f"{len(found)} row(s)", found[0] + 1

    if stats.kind == "preference":
        same = [i for i, r in enumerate(rows) if r.chosen == r.rejected]
        if same:
            count, row = first(same)
            out.append(f"{count} have chosen == rejected (e.g. row {row}): such a pair has no preference to learn; "
                       "fix or drop them.")
        empty = [i for i, r in enumerate(rows) if blank(r.chosen) or blank(r.rejected)]
        if empty:
            count, row = first(empty)
            out.append(f"{count} have an empty chosen or rejected answer (e.g. row {row}): fix or drop them.")
    else:
        empty = [i for i, r in enumerate(rows) if blank(r.completion)]
        if empty:
            count, row = first(empty)
            out.append(f"{count} have an empty completion (e.g. row {row}): fix or drop them.")
        labels = {r.label for r in rows}
        if len(labels) == 1:
            label = str(labels.pop()).lower()
            other = "false" if label == "true" else "true"
            out.append(f"every row is labelled {label}: KTO weighs desirable against undesirable completions, so "
                       f"add rows labelled {other}.")
    no_prompt = [i for i, r in enumerate(rows) if blank(r.prompt, "user")]
    if no_prompt:
        count, row = first(no_prompt)
        out.append(f"{count} have an empty prompt (e.g. row {row}): the answers are then compared without a "
                   "question; fill it or drop them.")
    answers = (lambda r: r.chosen + r.rejected) if stats.kind == "preference" else (lambda r: r.completion)
    texts = ["\x00".join(m["content"] for m in r.prompt + answers(r)) for r in rows]
    return out + _table_warnings(dataset, stats, texts)


def _runs(tokenizer, input_ids, labels) -> list[tuple[str, bool]]:
    """Consecutive runs of (decoded text, carries loss?)."""
    runs, current, flag = [], [], None
    for token, label in zip(input_ids, labels):
        trained = label != IGNORE_INDEX
        if flag is not None and trained != flag:
            runs.append((tokenizer.decode(current), flag))
            current = []
        current.append(token)
        flag = trained
    if current:
        runs.append((tokenizer.decode(current), flag))
    return runs
