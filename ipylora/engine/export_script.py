#!/usr/bin/env python
"""Retrain the LoRA adapter __RUN_NAME__ outside the notebook: transformers + peft + trl + datasets + jinja2.

Written by ipylora __IPYLORA_VERSION__ (%lora_export) from runs/__RUN_NAME__/run.json, whose recipe is
SETTINGS below. It repeats what the notebook did, step by step:

1. rows -> conversations: the data format's fields (SETTINGS["format"], SETTINGS["fields"]) become
   system / user / assistant messages;
2. conversations -> spans of text: the template wraps every turn; prompt spans carry no loss,
   assistant spans do;
3. spans -> tokens: the first span with the tokenizer's special tokens (BOS), the others without,
   EOS after each trained span; labels are -100 on untrained spans;
4. fit into max_length: a longer row keeps its last answer + EOS and loses prompt tokens from its
   start; a row trained whole is cut at the end; a row whose answer alone does not fit is left out;
5. SFTTrainer with the run's LoRA shape, learning-rate schedule, batch, clipping and seed.

A preference run (SETTINGS["method"]: dpo, simpo, orpo, kto) reads its rows as prompt / chosen /
rejected (or prompt / completion / label) instead, builds the prompt and each answer from the same
spans (`preference_tokens`: the answers exclude the prompt; a long row loses prompt tokens from
its start beside its longer answer), and trains with TRL's DPOTrainer, CPOTrainer (SimPO),
ORPOTrainer or KTOTrainer and the run's beta / loss_type / gamma. DPO and KTO compare against a
reference policy: the base (a fresh adapter starts as the base) or, with --from-adapter, the
adapter the run started from, which is loaded as the start and which TRL copies, frozen, as "ref".

    python train.py [--data FILE] [--model PATH_OR_ID] [--output DIR]

The default data file holds the rows the run trained on (JSON lines, already shuffled and split).
--data FILE reads the table the dataset was made from instead (jsonl, json, csv or tsv) and
applies the run's --shuffle / --limit / --eval split to it, as the notebook did.

Importing this file trains nothing: `tokenize(read_rows(path), tokenizer)` gives the exact
input_ids and labels training uses (`preference_tokens(...)` for a preference run).
"""

import argparse
import csv
import json
import math
import tempfile
import time
from pathlib import Path

SETTINGS = {}  # filled in by %lora_export

IGNORE_INDEX = -100
REQUIRED = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
            "prompt-completion": ("prompt", "completion"), "text": ("text",),
            "preference": ("chosen", "rejected"), "unpaired-preference": ("prompt", "completion", "label")}
PAIRED, UNPAIRED = ("dpo", "simpo", "orpo"), ("kto",)
ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


# -- 1. rows -> conversations --------------------------------------------------------------------
def read_rows(path):
    """The data file as a list of {column: value} dicts (a missing cell is None)."""
    path = Path(path)
    if path.suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ","))
        return [{k: (None if v == "" else v) for k, v in row.items()} for row in rows]  # empty cell = missing
    text = path.read_text("utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:  # JSON lines
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):  # {"train": [...]} or a single object
        data = data.get("train", [data])
    return data


def split_rows(rows):
    """The run's --shuffle, --limit and --eval applied to the user's own table (as ipylora's data.py does)."""
    import numpy as np

    split = SETTINGS["split"]
    rng = np.random.default_rng(split["seed"])
    if split["shuffle"]:
        rows = [rows[i] for i in rng.permutation(len(rows))]
    if split["limit"] is not None:
        rows = rows[: split["limit"]]
    if split["eval"] is not None and not split["eval_from"]:
        n, share = len(rows), split["eval"]
        count = max(1, int(share) if share >= 1 else int(round(n * share)))
        held = set(np.random.default_rng(split["seed"] + 1).permutation(n)[:count].tolist())
        rows = [row for i, row in enumerate(rows) if i not in held]
    return rows


def cell_text(value):
    if isinstance(value, (list, tuple, dict)):
        return value  # conversations stay structured
    return value if isinstance(value, str) else str(value)


def field_values(rows, spec, field):
    """One value per row for `field`: a plain "{column}" keeps the cell, else the format string filled in."""
    import string

    keys = list(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(spec) if name is not None))
    required = field in REQUIRED[SETTINGS["format"]]
    values = []
    for number, row in enumerate(rows, start=1):
        missing = [k for k in keys if k not in row]
        if missing:
            raise SystemExit(f"The data has no column {missing[0]!r} (columns: {', '.join(row)}): the run read "
                             f"{field} from {spec!r}. Pass --data with the table the dataset was made from.")
        cells = {k: row[k] for k in keys}
        if any(v is None for v in cells.values()):
            if required:
                raise SystemExit(f"Row {number} has an empty cell in {spec!r} ({field}): fill it or drop the row.")
            cells = {k: "" if v is None else v for k, v in cells.items()}
        cells = {k: cell_text(v) for k, v in cells.items()}
        values.append(cells[keys[0]] if keys and spec == "{" + keys[0] + "}" else spec.format_map(cells))
    return values


def pair(prompt, response, system=""):
    conversation = [{"role": "system", "content": system}] if system else []
    return conversation + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def turns(cell, number, role_key, content_key, roles):
    if isinstance(cell, str):  # a JSON string in a CSV cell
        cell = json.loads(cell)
    conversation = []
    for turn in cell:
        role = roles.get(str(turn[role_key]).lower())
        if role is None:
            raise SystemExit(f"Row {number} has {role_key} {turn[role_key]!r}: use one of {', '.join(roles)}.")
        content = turn[content_key]
        conversation.append({"role": role, "content": "" if content is None else str(content)})
    return conversation


def conversations(rows):
    """Every row as messages, exactly as the notebook's data format built them."""
    fmt = SETTINGS["format"]
    v = {field: field_values(rows, spec, field) for field, spec in SETTINGS["fields"].items()}
    n = len(rows)
    systems = v.get("system") or [""] * n
    if fmt == "messages":
        return [turns(c, i, "role", "content", ROLES) for i, c in enumerate(v["messages"], start=1)]
    if fmt == "sharegpt":
        return [turns(c, i, "from", "value", SHAREGPT_ROLES) for i, c in enumerate(v["conversations"], start=1)]
    if fmt == "alpaca":
        inputs = v.get("input") or [""] * n
        prompts = [f"{i}\n\n{x}" if x.strip() else i for i, x in zip(v["instruction"], inputs)]
        return [pair(p, r, s) for p, r, s in zip(prompts, v["output"], systems)]
    if fmt == "prompt-completion":
        return [pair(p, r, s) for p, r, s in zip(v["prompt"], v["completion"], systems)]
    return [[{"role": "assistant", "content": text}] for text in v["text"]]


# -- 2. conversations -> spans -------------------------------------------------------------------
def compile_jinja(source):
    """Compiled like transformers compiles chat templates (sandboxed, trim/lstrip blocks, loop controls)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers) renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def format_segments(messages, template):
    """A "{prompt} ... {response}" template: system and user turns fill the prompt slot."""
    prefix, suffix = template["prefix"], template["suffix"]
    trained_suffix = suffix.rstrip()  # whitespace after the end-of-turn text is not trained
    segs, users, tail = [], [], ""
    for message in messages:
        if message["role"] == "assistant":
            segs.append((tail + prefix.replace("{prompt}", "\n\n".join(users)), False))
            segs.append((message["content"] + trained_suffix, True))
            users, tail = [], suffix[len(trained_suffix):]
        else:
            users.append(message["content"])
    return segs or [("", False)]


def chat_segments(messages, template, compiled):
    """A Jinja chat template: each assistant turn is what rendering it adds to the conversation before it."""
    def render(part, generation_prompt):
        return compiled.render(messages=part, add_generation_prompt=generation_prompt,
                               bos_token=template["bos_token"], eos_token=template["eos_token"])

    segs, done = [], ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, after = render(messages[:k], True), render(messages[: k + 1], False)
        trained = after[len(before):].rstrip()
        segs.append((before[len(done):], False))
        segs.append((trained, True))
        done = before + trained
    bos = template["bos_token"]
    if segs and template["strip_bos"] and segs[0][0].startswith(bos):
        segs[0] = (segs[0][0][len(bos):], False)
    return segs or [("", False)]


def text_segments(text):
    """Text format: with --response-after MARKER, the text up to and including the marker is the prompt."""
    marker = SETTINGS["response_after"]
    if not marker:
        return format_segments([{"role": "assistant", "content": text}], {"prefix": "", "suffix": ""})
    if marker not in text:
        raise SystemExit(f"A row does not contain the --response-after marker {marker!r}: fix or drop it "
                         f"({text[:60]!r}...).")
    cut = text.index(marker) + len(marker)
    return [(text[:cut], False), (text[cut:], True)]


def templater():
    """messages -> [(text, trained), ...] in the run's template."""
    template = SETTINGS["template"]
    if template["kind"] == "jinja":
        compiled = compile_jinja(template["source"])
        return lambda messages: chat_segments(messages, template, compiled)
    return lambda messages: format_segments(messages, template)


def segments(rows):
    """[(text, trained), ...] per row."""
    if SETTINGS["format"] == "text":
        return [text_segments(messages[0]["content"]) for messages in conversations(rows)]
    spans = templater()
    return [spans(messages) for messages in conversations(rows)]


# -- 3 and 4. spans -> tokens, fitted into max_length ----------------------------------------------
def join_spans(segs, tokenizer, train_on_prompt=False, bos=True):
    """(input_ids, labels) of one row's spans: the first span with the tokenizer's special tokens
    (its BOS) unless `bos` is False, the others without; EOS after each trained span."""
    eos = tokenizer.eos_token_id
    ids = list(tokenizer(segs[0][0], add_special_tokens=bos)["input_ids"])
    labels = list(ids) if train_on_prompt or segs[0][1] else [IGNORE_INDEX] * len(ids)
    for text, trained in segs[1:]:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        if trained:
            labels += piece
            if not piece or piece[-1] != eos:
                ids.append(eos)
                labels.append(eos)
        else:
            labels += piece if train_on_prompt else [IGNORE_INDEX] * len(piece)
    return ids, labels


def tokenize(rows, tokenizer):
    """{"input_ids": [...], "labels": [...]} per kept row, and how many rows max_length cut or left out."""
    max_length, train_on_prompt = SETTINGS["train"]["max_length"], SETTINGS["train_on_prompt"]
    bos = tokenizer.bos_token_id
    out = {"input_ids": [], "labels": []}
    cut = dropped = 0
    for segs in segments(rows):
        ids, labels = join_spans(segs, tokenizer, train_on_prompt)
        head = int(bos is not None and bool(ids) and ids[0] == bos)
        if len(ids) > max_length:
            cut += 1
            start = len(labels)  # where the last trained span (the answer + EOS) begins
            while start > 0 and labels[start - 1] != IGNORE_INDEX:
                start -= 1
            if start <= head:  # trained whole (text without a marker, train_on_prompt): cut the end
                ids, labels = ids[:max_length], labels[:max_length]
            elif head + len(ids) - start <= max_length:  # keep the answer + EOS, drop prompt tokens after BOS
                keep = max_length - head
                ids, labels = ids[:head] + ids[-keep:], labels[:head] + labels[-keep:]
            else:  # the answer alone does not fit
                dropped += 1
                continue
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    out["cut"], out["dropped"] = cut - dropped, dropped
    return out


# -- preference rows -> prompt and answer tokens (preference runs) ---------------------------------
def messages_cell(cell, number, field):
    """A cell holding a list of {role, content} (or its JSON text) as messages, else None (text)."""
    if isinstance(cell, str):
        if not cell.lstrip().startswith("["):
            return None
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError:
            return None
        if not (isinstance(cell, list) and cell and all(isinstance(m, dict) for m in cell)):
            return None
    if not isinstance(cell, (list, tuple)):
        return None
    return turns(cell, number, "role", "content", ROLES)


def answer_messages(cell, number, field):
    found = messages_cell(cell, number, field)
    return found if found is not None else [{"role": "assistant", "content": cell}]


def split_shared(chosen, rejected):
    """(prompt, chosen answer, rejected answer): the prompt is the leading messages both share."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    last = min(max(i for i, m in enumerate(c) if m["role"] == "assistant") for c in (chosen, rejected))
    shared = min(shared, last)
    return chosen[:shared], chosen[shared:], rejected[shared:]


def with_system(prompt, system):
    if not system or not system.strip() or (prompt and prompt[0]["role"] == "system"):
        return prompt
    return [{"role": "system", "content": system}] + prompt


def label_value(value, number):
    text = str(value).strip().lower()
    if text in ("true", "1", "1.0"):
        return True
    if text in ("false", "0", "0.0"):
        return False
    raise SystemExit(f"Row {number}: label {value!r} is not true or false.")


def preference_rows(rows):
    """(prompt messages, [answer messages...], label) per row, as the notebook's preference formats read them:
    paired rows give [chosen, rejected]; unpaired rows (or paired rows for KTO) one completion and its label."""
    v = {field: field_values(rows, spec, field) for field, spec in SETTINGS["fields"].items()}
    n = len(rows)
    systems = v.get("system") or [""] * n
    out = []
    if SETTINGS["format"] == "unpaired-preference":
        for number, (prompt, completion, label, system) in enumerate(
                zip(v["prompt"], v["completion"], v["label"], systems), start=1):
            found = messages_cell(prompt, number, "prompt")
            prompt = found if found is not None else [{"role": "user", "content": prompt}]
            out.append((with_system(prompt, system), [answer_messages(completion, number, "completion")],
                        label_value(label, number)))
        return out
    prompts = v.get("prompt") or [None] * n
    for number, (prompt, chosen, rejected, system) in enumerate(
            zip(prompts, v["chosen"], v["rejected"], systems), start=1):
        chosen_m, rejected_m = messages_cell(chosen, number, "chosen"), messages_cell(rejected, number, "rejected")
        if chosen_m is not None and (chosen_m[0]["role"] != "assistant" or rejected_m[0]["role"] != "assistant"):
            prompt_m, chosen_m, rejected_m = split_shared(chosen_m, rejected_m)  # the prompt is inside them
        else:
            found = messages_cell(prompt, number, "prompt")
            prompt_m = found if found is not None else [{"role": "user", "content": prompt}]
        chosen_m = chosen_m if chosen_m is not None else answer_messages(chosen, number, "chosen")
        rejected_m = rejected_m if rejected_m is not None else answer_messages(rejected, number, "rejected")
        prompt_m = with_system(prompt_m, system)
        if SETTINGS["method"] in UNPAIRED:  # as TRL's KTO reads paired data: chosen desirable, rejected not
            out += [(prompt_m, [chosen_m], True), (prompt_m, [rejected_m], False)]
        else:
            out.append((prompt_m, [chosen_m, rejected_m], None))
    return out


def preference_tokens(rows, tokenizer):
    """TRL's pre-tokenized columns: prompt_ids with chosen_ids / rejected_ids (paired methods) or
    completion_ids / label (KTO), built from the template's spans as the notebook built them, and how
    many rows max_length cut or left out."""
    max_length, bos = SETTINGS["train"]["max_length"], tokenizer.bos_token_id
    spans = templater()
    paired = SETTINGS["method"] not in UNPAIRED
    out = {"prompt_ids": [], **({"chosen_ids": [], "rejected_ids": []} if paired else {"completion_ids": [], "label": []})}
    cut = dropped = 0
    for prompt, answers, label in preference_rows(rows):
        prompt_segs = spans(prompt + [{"role": "assistant", "content": ""}])[:-1] or [("", False)]
        # Each answer is the spans that follow the prompt's in the whole conversation, after an empty
        # untrained span: no BOS, and EOS after every trained span, the first included.
        answer_ids = [join_spans([("", False)] + spans(prompt + answer)[len(prompt_segs):], tokenizer, bos=False)[0]
                      for answer in answers]
        ids = join_spans(prompt_segs, tokenizer)[0]
        head = int(bos is not None and bool(ids) and ids[0] == bos)
        longest = max(map(len, answer_ids))
        if len(ids) + longest > max_length:  # the answers are never cut: the prompt loses tokens after BOS
            if head + longest > max_length:
                dropped += 1
                continue
            cut += 1
            keep = max_length - head - longest
            ids = ids[:head] + ids[len(ids) - keep:]
        out["prompt_ids"].append(ids)
        if paired:
            out["chosen_ids"].append(answer_ids[0])
            out["rejected_ids"].append(answer_ids[1])
        else:
            out["completion_ids"].append(answer_ids[0])
            out["label"].append(label)
    out["cut"], out["dropped"] = cut, dropped
    return out


def pair_features(row):
    """One pair as CPO/ORPO's collator reads it (their tokenize_row would tokenize text again)."""
    prompt = list(row["prompt_ids"])
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        answer = list(row[f"{side}_ids"])
        out[f"{side}_input_ids"] = prompt + answer
        out[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
        out[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
    return out


def config(config_class, settings, **knobs):
    """`config_class` from the common settings (those it has fields for) and the method's knobs."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in settings.items() if k in fields}, **knobs)


def add_tokens(tokenizer, model, spec):
    """--add-tokens: the new tokens as whole tokens (shown in decoded text), the embeddings grown to fit
    them; returns (input, output embedding names, tied) to train in full, or None without any."""
    from tokenizers import AddedToken

    if not spec:
        return None
    vocab = tokenizer.get_vocab()
    names = [t.strip() for t in spec.split(",") if t.strip() and t.strip() not in vocab]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in dict.fromkeys(names)])
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    wanted = {id(inputs), id(outputs)}
    saved = [name.rsplit(".", 1)[-1] for name, module in model.named_modules() if id(module) in wanted]
    return saved, outputs is not None and outputs.weight is inputs.weight


def lora_config(LoraConfig, lora, new_tokens=None):
    """The run's adapter: shape, targets (names, all-linear, or a regular expression PEFT matches in
    full) and variant (DoRA, rsLoRA, init, modules trained in full; --add-tokens' embeddings)."""
    targets = lora["target_modules"]
    if targets != "all-linear" and not any(c in targets for c in "*+?[]()|^$\\"):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    init = lora.get("init")
    saved = [m.strip() for m in (lora.get("modules_to_save") or "").split(",") if m.strip()] or None
    config = dict(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], bias="none",
                  task_type="CAUSAL_LM", target_modules=targets, use_dora=bool(lora.get("dora")),
                  use_rslora=bool(lora.get("rslora")), init_lora_weights=True if init in (None, "loftq") else init,
                  modules_to_save=saved)
    if new_tokens is not None:
        embeddings, tied = new_tokens
        config["modules_to_save"] = list(dict.fromkeys([*(saved or []), *embeddings]))
        config["ensure_weight_tying"] = tied
    if SETTINGS.get("peft") and init not in ("pissa", "olora"):
        # The layers and expert parameters the notebook's adapter was trained on, as it saved them
        # (for MoE models more than all-linear gives, and no dropout on expert parameters).
        config.update(SETTINGS["peft"])
        config.pop("exclude_modules", None)  # another adapter's modules in the notebook, not here
    return LoraConfig(**config)


def trainer_for(model, settings, data, tokenizer, callbacks):
    """The run's TRL trainer, told to take our token columns as they are."""
    method, train = SETTINGS["method"], SETTINGS["train"]
    common = dict(model=model, train_dataset=data, processing_class=tokenizer, callbacks=callbacks)
    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        args = config(SFTConfig, settings, dataset_kwargs={"skip_prepare_dataset": True}, max_length=None)
        return SFTTrainer(args=args, **common)
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        class Trainer(DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset  # TRL would extract a prompt and tokenize text again

        # No ref_model: TRL copies the start adapter ("default": fresh = the base, or --from-adapter's) into a
        # frozen "ref" adapter; its log-probabilities are computed once, before the first step.
        args = config(DPOConfig, settings, beta=train["beta"], loss_type=train["loss_type"] or "sigmoid",
                      max_length=None, precompute_ref_log_probs=True)
        return Trainer(args=args, **common)
    if method in ("simpo", "orpo"):
        if method == "simpo":  # SimPO is CPO's simpo loss without the behaviour-cloning term (cpo_alpha=0)
            from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Base

            knobs = dict(loss_type="simpo", beta=train["beta"], simpo_gamma=train["gamma"], cpo_alpha=0.0)
        else:
            from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Base

            knobs = dict(beta=train["beta"])

        class Trainer(Base):
            def tokenize_row(self, feature, model=None):
                return pair_features(feature)

        return Trainer(args=config(Config, settings, max_length=10**6, **knobs), **common)
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        class Trainer(KTOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                # Our token columns are final; KTO's KL term pairs each completion with its batch neighbour's
                # prompt, so rows are shuffled once with the seed (pairs' chosen/rejected sit side by side).
                dataset = dataset.shuffle(seed=train["seed"]).flatten_indices()
                if not self.calculate_KL:
                    return dataset

                def rotate(batch):
                    return {"KL_completion_ids": batch["completion_ids"][-1:] + batch["completion_ids"][:-1]}

                return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)

        args = config(KTOConfig, settings, beta=train["beta"], max_length=None, precompute_ref_log_probs=True,
                      train_sampling_strategy="sequential")
        return Trainer(args=args, **common)
    raise SystemExit(f"This script does not know the training method {method!r}.")


# -- 5. training ---------------------------------------------------------------------------------
def load(model_path):
    """Tokenizer and base model; precision from the hardware (bf16 GPU, fp16 older GPU, fp32 CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from transformers.utils import logging

    logging.disable_progress_bar()  # the progress lines below are the output
    trust = SETTINGS["trust_remote_code"]
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe: labels come from the spans, never from pad ids
    cuda = torch.cuda.is_available()
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    kwargs = dict(dtype=dtype, trust_remote_code=trust)
    if SETTINGS["quantization"] == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    elif SETTINGS["quantization"] == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if SETTINGS["quantization"]:
        kwargs["device_map"] = {"": 0} if cuda else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if not SETTINGS["quantization"]:
        model.to("cuda" if cuda else "cpu")
    return tokenizer, model, dtype


def progress(steps):
    """A Trainer callback that prints one line about every 10% of the steps."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self):
            self.every, self.started, self.losses = max(1, round(steps / 10)), time.time(), []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            self.losses.append(float(logs["loss"]))
            step = state.global_step
            if step % self.every == 0 or step == steps:
                print(f"step {step}/{steps}  loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0.0):.2e}  "
                      f"{time.time() - self.started:.0f}s", flush=True)

    return Progress()


def compare(final):
    """The final loss beside the notebook's, and a line when they differ by more than 5%."""
    notebook = SETTINGS["final_loss"]
    print(f"final_loss={final:.6f} notebook_final_loss={notebook if notebook is None else f'{notebook:.6f}'}")
    if notebook is None or not notebook:
        return
    gap = abs(final - notebook) / abs(notebook)
    if gap > 0.05:
        import peft
        import torch
        import transformers
        import trl

        here = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "trl": trl.__version__}
        changed = [f"{k} {SETTINGS['versions'][k]} -> {v}" for k, v in here.items()
                   if SETTINGS["versions"].get(k) not in (None, v)]
        why = "; ".join(changed) if changed else "check --data and --model, and the hardware (precision)"
        print(f"DIFFERS: the final loss is {gap:.1%} away from the notebook's (more than 5%): {why}.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="The table the dataset was made from (jsonl, json, csv, "
                                                     "tsv); default: " + SETTINGS["data"])
    parser.add_argument("--model", default=SETTINGS["model"], help="Base model folder or hub id.")
    parser.add_argument("--output", default="runs-script/" + SETTINGS["name"], help="Where the adapter goes.")
    parser.add_argument("--from-adapter", default=SETTINGS["from_adapter"],
                        help="The adapter folder the run started from (its start and, for DPO/KTO, its reference)"
                             + (f"; default: {SETTINGS['from_adapter']}" if SETTINGS["from_adapter"] else ""))
    cli = parser.parse_args()
    train = SETTINGS["train"]

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from datasets import Dataset

    if cli.data is None:  # the default sits beside this script
        path = Path(__file__).resolve().parent / SETTINGS["data"]
        rows = read_rows(path) if SETTINGS["data_is_split"] else split_rows(read_rows(path))
    else:
        rows = split_rows(read_rows(cli.data))
    tokenizer, model, dtype = load(cli.model)
    new_tokens = add_tokens(tokenizer, model, SETTINGS["lora"].get("add_tokens"))
    tokens = tokenize(rows, tokenizer) if SETTINGS["method"] == "sft" else preference_tokens(rows, tokenizer)
    cut, dropped = tokens.pop("cut"), tokens.pop("dropped")
    if cut or dropped:
        print(f"max_length {train['max_length']}: {cut} row(s) cut, {dropped} left out "
              "(the answer alone is longer)")
    if not tokens["input_ids" if "input_ids" in tokens else "prompt_ids"]:
        raise SystemExit(f"No row fits into max_length {train['max_length']}: nothing to train on.")
    data = Dataset.from_dict(tokens)
    steps = train["steps"] or max(1, math.ceil(train["epochs"] * math.ceil(len(data) / train["batch_size"])))
    micro = min(train["micro_batch_size"] or train["batch_size"], train["batch_size"])
    while train["batch_size"] % micro:
        micro -= 1
    print(f"{len(data)} rows, {steps} steps of {train['batch_size']} rows ({SETTINGS['method']})", flush=True)

    set_seed(train["seed"])  # before the adapter: its initial weights come from this seed
    if SETTINGS["quantization"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = SETTINGS["lora"]
    if cli.from_adapter:  # start from that adapter's weights and shape
        model = PeftModel.from_pretrained(model, cli.from_adapter, is_trainable=True)
    else:
        model = get_peft_model(model, lora_config(LoraConfig, lora, new_tokens))
        if lora.get("init") == "loftq":  # LoftQ on an already 4-bit base, as PEFT documents it (CUDA only)
            from peft import replace_lora_weights_loftq
            from peft.tuners.lora import Linear4bit

            replace_lora_weights_loftq(model, model_path=cli.model)
            for module in model.modules():  # PEFT sets B·A to the residual; the layer adds scaling·B·A
                if isinstance(module, Linear4bit):
                    module.lora_B["default"].weight.data /= module.scaling["default"]

    cuda = torch.cuda.is_available()
    callback = progress(steps)
    with tempfile.TemporaryDirectory() as scratch:
        settings = dict(
            output_dir=scratch, max_steps=steps, per_device_train_batch_size=micro,
            gradient_accumulation_steps=train["batch_size"] // micro, learning_rate=train["lr"],
            lr_scheduler_type=train["scheduler"], warmup_steps=int(round(train["warmup_ratio"] * steps)),
            weight_decay=0.0, max_grad_norm=train["max_grad_norm"], bf16=cuda and dtype == torch.bfloat16,
            fp16=cuda and dtype == torch.float16, use_cpu=not cuda, gradient_checkpointing=False,
            logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
            seed=train["seed"], data_seed=train["seed"], dataloader_num_workers=0, remove_unused_columns=False,
            neftune_noise_alpha=train.get("neftune"),
        )
        trainer = trainer_for(model, settings, data, tokenizer, [callback])
        trainer.remove_callback(PrinterCallback)  # one line per 10% (above), not one dict per step
        trainer.remove_callback(ProgressCallback)
        if train.get("loraplus_ratio"):  # LoRA+: B learns loraplus_ratio times faster than A
            from peft.optimizers import create_loraplus_optimizer

            optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
            kwargs.pop("lr", None)
            trainer.optimizer = create_loraplus_optimizer(model, optimizer_cls, lr=train["lr"],
                                                          loraplus_lr_ratio=train["loraplus_ratio"], **kwargs)
        residual = lora.get("init") in ("pissa", "olora") and not cli.from_adapter
        if residual:  # PiSSA/OLoRA rewrite the base: keep the start to save a plain LoRA of the change
            model.save_pretrained(Path(scratch) / "initial", selected_adapters=["default"])
            model.peft_config["default"].init_lora_weights = True  # the saved start loads as a plain adapter
        trainer.train()
        # Not TRL's frozen "ref" copy; a PiSSA/OLoRA adapter as a plain LoRA that loads on the original base.
        model.save_pretrained(cli.output, selected_adapters=["default"],
                              **({"path_initial_model_for_weight_conversion": str(Path(scratch) / "initial")}
                                 if residual else {}))
    if new_tokens is not None:
        tokenizer.save_pretrained(cli.output)  # the adapter's tokens travel with it
    compare(callback.losses[-1])
    print(f"adapter saved to {cli.output}")


if __name__ == "__main__":
    main()
