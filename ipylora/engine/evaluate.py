"""Measuring an adapter (or the base model) on a dataset: how well it fits, and what it answers.

One teacher-forced pass gives the eval loss and its perplexity. The loss is one measure
everywhere: the mean cross-entropy per trained token over exactly the tokens training uses
(`dataset.tokenize` of the split at the run's `max_length`: every assistant turn and its EOS,
prompt tokens cut from the start where a row is too long). `token_loss` computes it, both for the
eval loss the live panel shows during training and for `%lora_eval`, so the two agree.

Then the model answers every prompt greedily (the templated prompt side: system prompt, earlier
turns and the last user turn, as trained), and each answer is scored against the row's response:

- exact match and token F1 after SQuAD's normalisation (lower case, punctuation and articles
  dropped, whitespace collapsed), so "A cat." matches "a cat";
- ROUGE-L F-measure from Google's `rouge-score` package, with a tokenizer that also splits CJK
  text into characters (the package's default drops every non-ASCII character);
- whether the answer ended with EOS before `max_new_tokens` (a model that never stops is the
  classic pad == eos failure), and the answer length in tokens.

Text rows without `--response-after` have no prompt to answer, so they get the loss only.

On preference data the answers are scored against the chosen (desirable) answer, and one more
figure says whether the adapter prefers chosen to rejected more than its reference policy does:
the summed log-probability of each answer after its prompt (`answer_logps`, over exactly the
`preference_tokens` training uses), under the adapter and under the reference (the run's
`--from-adapter`, else the base). A pair counts when the implicit reward margin
(log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)) is positive; the mean
margin is that log-ratio difference, beta-free (DPO's reward margin is beta times it).

With `rewards` (`--reward`, the specs GRPO trains with: engine/rewards.py) the model also answers
each prompt side as chat and GRPO lay it out (`prompt_tokens`: the template's prompt, the table
row, the last user turn), once and greedily, and each reward scores those answers with the table's
columns for their rows: its mean (rows it returned None for left out) and the weighted total, as
GRPO's reward curve sums it. Where those prompt ids are the ones the answer metrics use (the usual
case), one generation serves both. Prompt-only data (the `prompts` format) has no reference answer,
so it gets the rewards only: no loss, no overlap metrics.
"""

from __future__ import annotations

import math
import re
import string
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ipylora.engine import rewards
from ipylora.engine.config import GenerateArgs
from ipylora.engine.errors import ConfigError, DatasetError, UnknownNameError
from ipylora.engine.prompts import PROMPT_KIND, prompt_sides

SPLITS = ("all", "train", "eval")


@dataclass(frozen=True)
class EvalArgs:
    """One evaluation."""

    max_new_tokens: int = 256
    """Most tokens per generated answer; an answer that reaches it did not stop at EOS."""
    batch_size: int = 8
    """Rows per forward pass of the loss, and per generate() batch where answers are not decoded through
    a captured step (off CUDA; on CUDA, graphdecode.BATCH_ROWS rows at a time)."""
    limit: int | None = None
    """Evaluate only the first N rows of the split."""
    worst: int = 5
    """How many of the lowest-scoring rows to keep and show."""
    max_length: int | None = None
    """Longest sequence for the eval loss, in tokens; None: the run's own max_length (run.json), else 1024."""
    rewards: tuple = ()
    """`--reward` specs to score greedy answers with, as `%lora_train --method grpo` takes them: a notebook
    function's name (looked up in `session.namespace`), exact:COLUMN and the other built-ins, module:function,
    each with an optional :WEIGHT; a callable or a (spec, weight) pair works from Python."""

    def check(self) -> None:
        problems = [f"{flag} {value} must be at least {low}" for flag, value, low in (
            ("--max-new-tokens", self.max_new_tokens, 1), ("--batch-size", self.batch_size, 1),
            ("--worst", self.worst, 0), ("--max-length", self.max_length or 8, 8),
        ) if value < low]
        if self.limit is not None and self.limit < 1:
            problems.append(f"--limit {self.limit} must be at least 1")
        if problems:
            raise ConfigError("; ".join(problems) + ".")


@dataclass(frozen=True)
class Example:
    """One dataset row as evaluation sees it."""

    row: int
    """Row number in the split (0-based)."""
    prompt: str
    """The user's prompt before templating (what %lora_chat would be given)."""
    prompt_side: str
    """The templated text before the response, as trained."""
    response_side: str
    """The trained continuation (response plus the template's suffix)."""
    reference: str
    """The expected answer (response without the suffix)."""
    messages: tuple = ()
    """The prompt side as messages (system, earlier turns, last user turn): what a chat or compare
    with another adapter formats with that adapter's own template."""


def parse_dataset_spec(spec: str) -> tuple[str, str]:
    """"concepts:eval" -> ("concepts", "eval"); no split means all rows."""
    name, _, split = spec.partition(":")
    split = split or "all"
    if split not in SPLITS:
        raise ConfigError(f"Split {split!r} in {spec!r} is not one of {', '.join(SPLITS)}: e.g. {name}:eval.")
    return name, split


def split_part(dataset, split: str):
    """The dataset itself for "all", else its train or eval part. A dataset without splits is all "train"."""
    if split == "all":
        return dataset
    parts = dataset.splits() if hasattr(dataset, "splits") else {"train": dataset}
    part = parts.get(split)
    if part is None or not len(part):
        raise DatasetError(f"Dataset {dataset.name!r} has no {split} split: make one with "
                           f"%%lora_dataset {dataset.name} --eval 0.1, or evaluate on {dataset.name} (all rows).")
    return part


def dataset_examples(dataset, split: str = "all", limit: int | None = None) -> list[Example]:
    """The rows of `split` (the first `limit`), with raw prompt, templated text and reference."""
    return part_examples(split_part(dataset, split), limit)


def part_examples(part, limit: int | None = None) -> list[Example]:
    """The first `limit` rows of one split: the last user turn, the templated prompt side, the reference."""
    rows = list(range(len(part)))[:limit]
    pairs = part.pairs()
    suffix = getattr(part.template, "suffix", "")
    examples = []
    conversations = part.conversations()
    for row in rows:
        prompt_side, response_side = pairs[row]
        reference = response_side[:-len(suffix)] if suffix and response_side.endswith(suffix) else response_side
        # A chat template's response side ends with its end-of-turn text (<|im_end|>, <end_of_turn>),
        # which chat never shows: the reference is the answer itself.
        answer = next((m["content"] for m in reversed(conversations[row]) if m["role"] == "assistant"), None)
        if answer and answer != reference and reference.lstrip().startswith(answer.lstrip()):
            reference = answer
        messages = part.prompt_messages(row)
        users = [m["content"] for m in messages if m["role"] == "user"]
        examples.append(Example(row, users[-1] if users else "", prompt_side, response_side, reference,
                                tuple(messages)))
    return examples


PROMPT_ONLY_NOTE = "prompt-only data has no reference answers, so no loss or answer overlap: rewards only"


def answers_note(part) -> str | None:
    """Why rows of `part` cannot be answered and scored (None when they can)."""
    if getattr(part, "text_mode", False) and not part.args.response_after:
        return ("text rows have no prompt/answer split: pass --response-after MARKER to %%lora_dataset "
                "to score answers")
    return None


# -- scores -----------------------------------------------------------------------------------
_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+", re.UNICODE)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def words(text: str) -> list[str]:
    """Word tokens (CJK characters one by one) of the normalised text."""
    return _WORD.findall(normalize(text))


def token_f1(prediction: str, reference: str) -> float:
    from collections import Counter

    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class _RougeTokenizer:
    """rouge-score's tokenizer protocol, on the same words as F1 (CJK-aware)."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


def rouge_scorer():
    try:
        from rouge_score import rouge_scorer as module
    except ImportError:
        raise ConfigError("ROUGE-L needs the rouge-score package: pip install rouge-score") from None
    return module.RougeScorer(["rougeL"], tokenizer=_RougeTokenizer())


def score(prediction: str, reference: str, scorer) -> dict:
    return {
        "exact_match": float(normalize(prediction) == normalize(reference)),
        "f1": token_f1(prediction, reference),
        "rouge_l": scorer.score(reference, prediction)["rougeL"].fmeasure,
    }


# -- the evaluation ---------------------------------------------------------------------------
def part_tokens(part, tokenizer, max_length: int, limit: int | None = None) -> dict:
    """The tokens training uses for the first `limit` rows of `part` (all rows: exactly the run's)."""
    rows = range(limit) if limit is not None and limit < len(part) else None
    return part.tokenize(tokenizer, max_length, rows=rows)


def token_loss(model, tokens: dict, batch_size: int, max_tokens: int = 8192) -> tuple[float, int]:
    """(mean cross-entropy per trained token, number of trained tokens) of `tokens` under teacher forcing.

    `tokens` is `dataset.tokenize()`'s input_ids/labels. Every trained token weighs the same,
    whatever its row's length or batch, so the figure does not depend on `batch_size` (the
    Trainer's own eval_loss, a mean of per-batch means, did). Under torchrun every rank calls this
    on the same rows with the same weights, so all ranks get the same loss without a collective
    beyond FSDP's own. A batch holds at most `max_tokens` padded tokens (one row at least): the
    logits of a batch are rows x length x vocabulary, gigabytes for a real model.
    """
    import torch

    from ipylora.engine.data import IGNORE_INDEX

    total, count = 0.0, 0
    for _, logits, target in _forward(model, tokens["input_ids"], tokens["labels"], batch_size, max_tokens):
        keep = target != IGNORE_INDEX
        total += torch.nn.functional.cross_entropy(logits[keep].float(), target[keep], reduction="sum").item()
        count += int(keep.sum())
    return (total / count if count else float("nan")), count


def answer_logps(model, prompts: list, answers: list, batch_size: int, max_tokens: int = 8192) -> list[float]:
    """Summed log-probability of each answer's tokens after its prompt, under teacher forcing.

    `prompts[i] + answers[i]` is one sequence (the prompt's BOS included, the answer's EOS
    scored), as TRL's DPO/KTO trainers score a completion; batched like `token_loss`.
    """
    import torch

    from ipylora.engine.data import IGNORE_INDEX

    rows = [list(p) + list(a) for p, a in zip(prompts, answers)]
    labels = [[IGNORE_INDEX] * len(p) + list(a) for p, a in zip(prompts, answers)]
    out = [0.0] * len(rows)
    for batch, logits, target in _forward(model, rows, labels, batch_size, max_tokens):
        keep = target != IGNORE_INDEX
        scored = -torch.nn.functional.cross_entropy(logits[keep].float(), target[keep], reduction="none")
        sums = torch.zeros(len(batch), device=scored.device).index_add_(0, keep.nonzero()[:, 0], scored)
        for i, value in zip(batch, sums.tolist()):
            out[i] = value
    return out


def _forward(model, ids_rows: list, label_rows: list, batch_size: int, max_tokens: int):
    """(row indices, logits predicting positions 1.., their targets) per right-padded batch, without grad."""
    import torch

    from ipylora.engine.data import IGNORE_INDEX

    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in _batches([len(ids) for ids in ids_rows], batch_size, max_tokens):
            width = max(len(ids_rows[i]) for i in batch)
            # Right padding behind a causal mask leaves the real positions' logits unchanged.
            input_ids = torch.tensor([list(ids_rows[i]) + [0] * (width - len(ids_rows[i])) for i in batch], device=device)
            mask = torch.tensor([[1] * len(ids_rows[i]) + [0] * (width - len(ids_rows[i])) for i in batch], device=device)
            target = torch.tensor([list(label_rows[i]) + [IGNORE_INDEX] * (width - len(label_rows[i])) for i in batch],
                                  device=device)[:, 1:]
            yield batch, model(input_ids=input_ids, attention_mask=mask).logits[:, :-1], target


def _batches(lengths: list[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Row indices in batches of similar length (less padding), each within both limits."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        batch = batches[-1] if batches else None
        # Sorted by length, so row i is the batch's widest: the padded size is rows x lengths[i].
        if batch is None or len(batch) >= batch_size or (len(batch) + 1) * lengths[i] > max_tokens:
            batches.append([i])
        else:
            batch.append(i)
    return batches


def preference_scores(model, tokenizer, part, adapter: str, reference: str, args: EvalArgs,
                      beta: float | None = None) -> dict:
    """How much more `adapter` prefers the chosen answers than `reference` ("base": adapters disabled) does.

    Paired data: `accuracy` is the share of pairs whose implicit reward margin
    (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)) is positive, `margin` its mean (beta-free).
    Unpaired data (KTO): `accuracy` is the share of rows whose log-ratio log pi - log ref has the
    label's sign (positive for a desirable completion), `margin` the mean log-ratio of desirable
    rows minus that of undesirable ones. Tokens are the trainer's, at `args.max_length`.
    """
    from ipylora.engine.chat import _eval_mode, adapter_context

    paired = part.kind == "preference"
    total = len(part.preference_rows() if paired else part.unpaired_rows())
    rows = range(args.limit) if args.limit is not None and args.limit < total else None
    if paired:
        tokens = part.preference_tokens(tokenizer, args.max_length, rows=rows)
        prompts, answers = tokens["prompt_ids"] * 2, tokens["chosen_ids"] + tokens["rejected_ids"]
    else:
        tokens = part.unpaired_tokens(tokenizer, args.max_length, rows=rows)
        prompts, answers = tokens["prompt_ids"], tokens["completion_ids"]
    logps = {}
    for name in dict.fromkeys((adapter, reference)):
        with adapter_context(model, name), _eval_mode(model):
            logps[name] = answer_logps(model, prompts, answers, args.batch_size)
    ratios = [p - r for p, r in zip(logps[adapter], logps[reference])]
    n = len(tokens["prompt_ids"])
    if not n:
        raise DatasetError(f"No row of {part.name!r} fits --max-length {args.max_length} with its answers, so no "
                           "preference can be scored: raise --max-length.")
    if paired:
        margins = [ratios[i] - ratios[n + i] for i in range(n)]
        accuracy, margin = sum(m > 0 for m in margins) / n, sum(margins) / n
    else:
        labels = tokens["label"]
        accuracy = sum((r > 0) == bool(label) for r, label in zip(ratios, labels)) / n
        good = [r for r, label in zip(ratios, labels) if label]
        bad = [r for r, label in zip(ratios, labels) if not label]
        margin = (sum(good) / len(good) if good else 0.0) - (sum(bad) / len(bad) if bad else 0.0)
    return {"accuracy": accuracy, "margin": margin, "rows": n, "paired": paired, "reference": reference,
            "beta": beta, "reward_margin": None if beta is None else beta * margin,
            "left_out": len(tokens.truncation.dropped)}


def pick_reference(session, name: str, trained: dict, output: str) -> str:
    """The policy adapter `name` is measured against on preference data: the adapter its run started
    from (run.json's `from_adapter`, loaded from its run folder if need be), else "base"."""
    start = trained.get("from_adapter")
    if name == "base" or not start:
        return "base"
    if start not in session.adapters:
        if not (Path(output) / start / "run.json").exists():
            raise UnknownNameError(
                f"Run {name!r} started from adapter {start!r} (--from-adapter), its reference, which is neither "
                f"loaded nor a run in {output}/: load it with %lora_adapters --load FOLDER --as {start}.")
        active = session.active_adapter
        session.load_adapter(start, output=output)
        session.active_adapter = active  # loading the reference changes nothing chat uses
    return start


def evaluate(model, tokenizer, part, adapter: str | None, args: EvalArgs = EvalArgs(),
             reference: str | None = None, beta: float | None = None, namespace=None) -> dict:
    """Eval loss, perplexity and generation metrics of `adapter` ("base": none) on the split `part`.

    `args.max_length` must be set (the caller picks the run's); rows whose answer alone does not
    fit are left out of the loss, as training leaves them out. On preference data the answers are
    scored against the chosen ones, and with a `reference` ("base" or an adapter name) the
    preference accuracy and margin are measured against it (`beta`: the run's, to scale the margin).
    `args.rewards` score greedy answers (`reward_scores`); their names are looked up in `namespace`.
    """
    from ipylora.engine.chat import _eval_mode, adapter_context

    args.check()
    started = time.time()
    found = check_rewards(args.rewards, part, namespace)
    settings = {**asdict(replace(args, rewards=())), "rewards": [rewards.record_of(r) for r in found]}
    if part.kind == PROMPT_KIND:
        asked = reward_prompts(part, tokenizer, args)
        scores = reward_scores(found, asked, _generate(model, tokenizer, asked["prompt_ids"], args, adapter), part)
        return {"rows": scores["rows"], "loss_tokens": 0, "metrics": {}, "worst": [], "answers": [],
                "note": PROMPT_ONLY_NOTE, "preference": None, "rewards": scores, "settings": settings,
                "seconds": time.time() - started}
    tokens = part_tokens(part, tokenizer, args.max_length, args.limit)  # also resolves a `model` template
    with adapter_context(model, adapter), _eval_mode(model):
        loss, loss_tokens = token_loss(model, tokens, args.batch_size)
    metrics = {"eval_loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}
    preference = None
    if part.is_preference:
        if reference is None or reference == adapter:
            preference = {"note": f"not measured for {adapter}: it is its own reference, so every margin is 0 "
                                  "(evaluate an adapter trained on this data)"}
        else:
            preference = preference_scores(model, tokenizer, part, adapter, reference, args, beta)
            metrics.update(preference_accuracy=preference["accuracy"], preference_margin=preference["margin"])
    n = min(len(part), args.limit or len(part))
    note = answers_note(part)
    examples = part_examples(part, args.limit) if note is None else []
    prompts = [tokenizer(e.prompt_side)["input_ids"] for e in examples]
    asked = reward_prompts(part, tokenizer, args) if found else {"prompt_ids": []}
    answers = _generate(model, tokenizer, prompts + asked["prompt_ids"], args, adapter)
    scores = reward_scores(found, asked, answers[len(prompts):], part) if found else None
    if note is not None:
        return {"rows": n, "loss_tokens": loss_tokens, "metrics": metrics, "worst": [], "answers": [], "note": note,
                "preference": preference, "rewards": scores, "settings": settings, "seconds": time.time() - started}
    scorer = rouge_scorer()
    rows = []
    for example, answer in zip(examples, answers):
        rows.append({"row": example.row, "prompt": example.prompt, "reference": example.reference,
                     "answer": answer["text"], "stopped_at_eos": answer["stopped_at_eos"],
                     "answer_tokens": answer["tokens"], **score(answer["text"], example.reference, scorer)})
    metrics.update({
        "exact_match": sum(r["exact_match"] for r in rows) / n,
        "f1": sum(r["f1"] for r in rows) / n,
        "rouge_l": sum(r["rouge_l"] for r in rows) / n,
        "eos_stop": sum(r["stopped_at_eos"] for r in rows) / n,
        "answer_tokens": sum(r["answer_tokens"] for r in rows) / n,
    })
    worst = sorted(rows, key=lambda r: (r["rouge_l"], r["f1"], r["row"]))[:args.worst]
    return {"rows": n, "loss_tokens": loss_tokens, "metrics": metrics, "worst": worst, "answers": rows, "note": None,
            "preference": preference, "rewards": scores, "settings": settings, "seconds": time.time() - started}


def _generate(model, tokenizer, prompts: list, args: EvalArgs, adapter: str | None) -> list[dict]:
    """Greedy answers to `prompts` (token ids); a prompt that occurs twice is answered once."""
    from ipylora.engine.chat import generate_batch

    distinct = list(dict.fromkeys(tuple(ids) for ids in prompts))
    if not distinct:
        return []
    answers = generate_batch(model, tokenizer, [list(ids) for ids in distinct],
                             GenerateArgs(max_new_tokens=args.max_new_tokens), adapter, batch_size=args.batch_size)
    found = dict(zip(distinct, answers))
    return [found[tuple(ids)] for ids in prompts]


# -- rewards ------------------------------------------------------------------------------------
def check_rewards(specs, part, namespace=None) -> list:
    """`specs` as rewards.Reward, each signature checked against `part`'s columns, before the model is touched.

    Prompt-only data has nothing else to measure, so it needs a reward."""
    found = rewards.parse(list(specs or ()), namespace)
    if not found and part.kind == PROMPT_KIND:
        raise ConfigError(f"Dataset {part.name!r} holds prompts only, with no reference answers to compare with: "
                          "score the answers with --reward FN (a function in the notebook, or a built-in such as "
                          "exact:COLUMN, contains:COLUMN, regex:PATTERN, length:MIN-MAX).")
    rewards.check_columns(found, [str(c) for c in part.columns])
    if found:
        prompt_sides(part)  # whole texts have no prompt to answer: say so before the loss pass
    return found


def reward_prompts(part, tokenizer, args: EvalArgs):
    """The prompts rewards score answers to: GRPO's `prompt_tokens` of the first `args.limit` rows."""
    total = len(prompt_sides(part))
    return part.prompt_tokens(tokenizer, args.max_length, rows=range(min(total, args.limit or total)))


def reward_scores(found: list, asked, answers: list[dict], part) -> dict:
    """Each reward's mean over `answers` (the greedy answers to `asked`, `reward_prompts`) and the weighted
    total's, as GRPO logs "reward: NAME" and "reward". A reward's None rows are left out of its mean
    (`scored` counts the rest); the total of a row leaves out its None terms, as TRL sums them."""
    rows = list(asked["_row"])
    frame = part.frame
    columns = {str(c): [values[r] for r in rows] for c, values in ((c, frame[c].tolist()) for c in frame.columns)
               if not str(c).startswith("_")}
    texts, completions = list(asked["_prompt_text"]), [a["text"] for a in answers]
    per_reward = [rewards.score(r, texts, completions, columns, rows) for r in found]
    totals = rewards.combine(found, per_reward)
    per_row = [{"row": row, "prompt": text, "answer": answer["text"], "stopped_at_eos": answer["stopped_at_eos"],
                "answer_tokens": answer["tokens"], "total": totals[i],
                "rewards": {r.name: values[i] for r, values in zip(found, per_reward)}}
               for i, (row, text, answer) in enumerate(zip(rows, texts, answers))]
    return {"rows": len(rows), "total": _mean(totals),
            "per_reward": {r.name: {"mean": _mean(values), "weight": r.weight, "spec": rewards.record_of(r),
                                    "scored": sum(not math.isnan(v) for v in values)}
                           for r, values in zip(found, per_reward)},
            "cut_prompts": asked.truncation.cut_prompt, "answers": per_row}


def _mean(values: list[float]) -> float | None:
    """The mean of the non-NaN values; None (JSON null) when every one is NaN."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def read_evals(run_dir: Path) -> list[dict]:
    """Earlier evals of a run (oldest first)."""
    from ipylora.engine.runs import read_json

    path = Path(run_dir) / "eval.json"
    return read_json(path).get("evals", []) if path.exists() else []


def save_eval(run_dir: Path, record: dict) -> list[dict]:
    """Append `record` to run_dir/eval.json (atomically); returns all evals, oldest first."""
    from ipylora.engine.runs import write_json

    history = read_evals(run_dir) + [record]
    write_json(Path(run_dir) / "eval.json", {"evals": history})
    return history


def run_eval(session, name: str, dataset: str, split: str = "all", args=None, output: str = "runs") -> dict:
    """Eval loss, perplexity and answer metrics of adapter `name` ("base": none) on a dataset split;
    appended to runs/NAME/eval.json. Returns this eval and the earlier ones.

    The loss is over the tokens training uses at the run's max_length (run.json), unless
    `args.max_length` says otherwise, so it is the eval loss the run's panel showed. `args.rewards`
    names are looked up in `session.namespace` (the notebook's, which the magics set); their means
    go to eval.json under "rewards", the scored answers to the returned "reward_answers".
    """
    from ipylora.engine.config import TrainArgs
    from ipylora.engine.runs import read_json

    args = args or EvalArgs()
    args.check()
    part = split_part(session.dataset(dataset), split)
    namespace = getattr(session, "namespace", None)
    check_rewards(args.rewards, part, namespace)  # a bad --reward fails before an adapter is loaded
    if name != "base" and name not in session.adapters and (Path(output) / name / "run.json").exists():
        session.load_adapter(name, output=output)
    run_dir = session.adapter(name).run_dir if name != "base" else Path(output) / "base"
    record_path = Path(run_dir) / "run.json"
    trained = read_json(record_path).get("train", {}) if record_path.exists() else {}
    if args.max_length is None:
        args = replace(args, max_length=trained.get("max_length") or TrainArgs.max_length)
    reference = pick_reference(session, name, trained, output) if part.is_preference else None
    with session._holding_model():
        session._chat_adapter(name)
        result = evaluate(session.model, session.tokenizer, part, name, args, reference=reference,
                          beta=trained.get("beta"), namespace=namespace)
    record = {"name": name, "model": session.model_id, "dataset": dataset, "split": split, "time": time.time(),
              **{k: result[k] for k in ("rows", "metrics", "worst", "note", "preference", "settings", "seconds")}}
    scores = result["rewards"]
    if scores is not None:  # the per-row answers stay out of eval.json, as the answer metrics' do
        record["rewards"] = {k: v for k, v in scores.items() if k != "answers"}
    history = save_eval(Path(run_dir), record)
    return {**record, "answers": result["answers"], "reward_answers": scores["answers"] if scores else [],
            "history": history, "path": str(Path(run_dir) / "eval.json")}
