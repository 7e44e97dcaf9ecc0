"""%%lora_dataset end to end: every source, every format, every template, through the magic.

Each test asserts what training will see: the text of a sample's untrained span(s), and exactly
which tokens carry loss (decoded), EOS included.
"""

import copy
import json

import pandas as pd
import pytest
from IPython.core.interactiveshell import InteractiveShell

from ipylora.engine.data import IGNORE_INDEX

ROWS = [{"concept": "Machine Learning", "description": "a glowing brain"},
        {"concept": "Neural Networks", "description": "nodes, neon cyan"}]
HA_PROMPT = "###Human:\nMachine Learning\n\n### Assistant:\n"


@pytest.fixture
def shell(fresh_session, tiny_tokenizer):
    ip = InteractiveShell.instance()
    ip.history_manager.enabled = False
    ip.run_line_magic("load_ext", "ipylora")
    fresh_session._tiny_tokenizer = tiny_tokenizer  # the preview tokenizer, loaded once per test run
    yield ip


def dataset(name):
    from ipylora.engine import get_session

    return get_session().datasets[name]


def spans(data, tokenizer, row=0):
    """(untrained text, trained text) of one row, decoded from the labels."""
    tokens = data.tokenize(tokenizer, max_length=4096)
    ids, labels = tokens["input_ids"][row], tokens["labels"][row]
    prompt = tokenizer.decode([i for i, l in zip(ids, labels) if l == IGNORE_INDEX], skip_special_tokens=True)
    trained = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert all(i == l for i, l in zip(ids, labels) if l != IGNORE_INDEX)
    return prompt, tokenizer.decode(trained)


def write_sources(tmp_path):
    frame = pd.DataFrame(ROWS)
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_csv(tmp_path / "d.tsv", index=False, sep="\t")
    frame.to_json(tmp_path / "d.json", orient="records")
    frame.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    (tmp_path / "d.yaml").write_text("".join(f"- concept: {r['concept']}\n  description: {r['description']}\n" for r in ROWS))
    frame.to_parquet(tmp_path / "d.parquet")
    frame.to_feather(tmp_path / "d.arrow")
    import datasets

    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "parts").mkdir()
    frame.iloc[:1].to_json(tmp_path / "parts" / "a.jsonl", orient="records", lines=True)
    frame.iloc[1:].to_json(tmp_path / "parts" / "b.jsonl", orient="records", lines=True)
    return frame


INLINE = {
    "csv": "concept,description\nMachine Learning,a glowing brain\nNeural Networks,\"nodes, neon cyan\"\n",
    "tsv": "concept\tdescription\nMachine Learning\ta glowing brain\nNeural Networks\tnodes, neon cyan\n",
    "json": json.dumps(ROWS, indent=1),
    "jsonl": "\n".join(json.dumps(r) for r in ROWS),
    "yaml": "- concept: Machine Learning\n  description: a glowing brain\n- concept: Neural Networks\n  description: nodes, neon cyan\n",
}


@pytest.mark.parametrize("kind", sorted(INLINE))
def test_inline_sources(shell, tiny_tokenizer, kind):
    shell.run_cell_magic("lora_dataset", "d --columns prompt=concept,response=description", INLINE[kind])
    data = dataset("d")
    assert len(data) == 2 and data.columns == ["concept", "description"]
    assert spans(data, tiny_tokenizer) == (HA_PROMPT, "a glowing brain<|eos|>")
    assert spans(data, tiny_tokenizer, 1)[1] == "nodes, neon cyan<|eos|>"


@pytest.mark.parametrize("source", ["d.csv", "d.tsv", "d.json", "d.jsonl", "d.yaml", "d.parquet", "d.arrow",
                                    "saved", "parts/*.jsonl", "frame", "hf_dataset", "hf_dict", "records",
                                    "hf:parts"])
def test_file_variable_and_hub_sources(shell, tiny_tokenizer, tmp_path, source):
    import datasets

    frame = write_sources(tmp_path)
    shell.user_ns.update(frame=frame, records=ROWS, hf_dataset=datasets.Dataset.from_pandas(frame),
                         hf_dict=datasets.DatasetDict(train=datasets.Dataset.from_pandas(frame)))
    shell.run_line_magic("lora_dataset", f"d --from {source} --prompt {{concept}} --response {{description}}")
    data = dataset("d")
    assert len(data) == 2
    assert spans(data, tiny_tokenizer) == (HA_PROMPT, "a glowing brain<|eos|>")


FORMATS = [
    ("text", {"text": ["all of this is trained"]}, "", "all of this is trained<|eos|>"),
    ("alpaca", {"instruction": ["Add"], "input": ["2+2"], "output": ["4"]},
     "###Human:\nAdd\n\n2+2\n\n### Assistant:\n", "4<|eos|>"),
    ("prompt-completion", {"prompt": ["Hi"], "completion": ["Hello"]}, "###Human:\nHi\n\n### Assistant:\n", "Hello<|eos|>"),
    ("messages", {"messages": [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]]},
     "###Human:\nHi\n\n### Assistant:\n", "Yo<|eos|>"),
    ("sharegpt", {"conversations": [[{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]]},
     "###Human:\nHi\n\n### Assistant:\n", "Yo<|eos|>"),
]


@pytest.mark.parametrize("name,columns,prompt,trained", FORMATS, ids=[f[0] for f in FORMATS])
def test_formats_are_detected(shell, tiny_tokenizer, name, columns, prompt, trained):
    shell.user_ns["frame"] = pd.DataFrame(columns)
    shell.run_line_magic("lora_dataset", "d --from frame")
    data = dataset("d")
    assert data.mapping.format.name == name
    assert spans(data, tiny_tokenizer) == (prompt, trained)


def test_format_override_and_column_mapping(shell, tiny_tokenizer):
    shell.user_ns["frame"] = pd.DataFrame({"prompt": ["Hi"], "completion": ["Hello"], "text": ["raw text"]})
    shell.run_line_magic("lora_dataset", "auto --from frame")
    assert dataset("auto").mapping.format.name == "prompt-completion"
    shell.run_line_magic("lora_dataset", "forced --from frame --format text")
    assert spans(dataset("forced"), tiny_tokenizer) == ("", "raw text<|eos|>")
    shell.user_ns["chats"] = pd.DataFrame({"dialog": [[{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]]})
    shell.run_line_magic("lora_dataset", "mapped --from chats --format sharegpt --columns conversations=dialog")
    assert spans(dataset("mapped"), tiny_tokenizer)[1] == "A<|eos|>"
    shell.user_ns["instr"] = pd.DataFrame({"task": ["Add"], "ctx": [""], "answer_text": ["4"]})
    shell.run_line_magic("lora_dataset", "alp --from instr --columns instruction=task,input=ctx,output=answer_text "
                                         "--template alpaca")
    prompt, trained = spans(dataset("alp"), tiny_tokenizer)
    assert prompt.endswith("### Instruction:\nAdd\n\n### Response:\n") and trained == "4<|eos|>"


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Ciao"}]


def trained_runs(data, tokenizer):
    """Decoded runs of consecutive trained tokens of row 0."""
    tokens = data.tokenize(tokenizer, max_length=4096)
    runs, current = [], []
    for i, label in zip(tokens["input_ids"][0], tokens["labels"][0]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(i)
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("template,expected", [
    ("human-assistant", ["Hello<|eos|>", "Ciao<|eos|>"]),
    ("chatml", ["Hello<|im_end|><|eos|>", "Ciao<|im_end|><|eos|>"]),
])
def test_multi_turn_mask_is_exactly_the_assistant_turns(shell, tiny_tokenizer, template, expected):
    shell.user_ns["chats"] = [{"messages": CONVERSATION}]
    shell.run_line_magic("lora_dataset", f"chats --from chats --template {template}")
    assert trained_runs(dataset("chats"), tiny_tokenizer) == expected


def test_eos_trained_per_turn_when_pad_equals_eos(shell, tiny_tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    shell.user_ns["chats"] = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}]
    shell.run_line_magic("lora_dataset", "chats --from chats --template chatml")
    tokens = dataset("chats").tokenize(tokenizer, max_length=4096)
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(
        [{"input_ids": i, "labels": l} for i, l in zip(tokens["input_ids"], tokens["labels"])])
    for row, ids in enumerate(tokens["input_ids"]):
        eos_positions = [p for p, i in enumerate(ids) if i == tokenizer.eos_token_id]
        assert len(eos_positions) == (2 if row == 0 else 1)
        assert all(batch["labels"][row, p].item() == tokenizer.eos_token_id for p in eos_positions)
        assert (batch["labels"][row, len(ids):] == IGNORE_INDEX).all()


def test_templates_custom_jinja_and_model(shell, tiny_tokenizer, tmp_path, fresh_session):
    shell.user_ns["frame"] = pd.DataFrame(ROWS)
    shell.run_line_magic("lora_dataset", 'c --from frame --template "Q: {prompt}\\nA: {response}"')
    assert spans(dataset("c"), tiny_tokenizer) == ("Q: Machine Learning\nA: ", "a glowing brain<|eos|>")
    (tmp_path / "t.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}</turn>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    shell.run_line_magic("lora_dataset", "j --from frame --template t.jinja")
    assert spans(dataset("j"), tiny_tokenizer) == ("<user>Machine Learning<assistant>", "a glowing brain</turn><|eos|>")
    # `model`: the resident tokenizer's own chat template, through apply_chat_template.
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                               "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}[assistant] {% endif %}")
    fresh_session.tokenizer = tokenizer
    shell.run_line_magic("lora_dataset", "m --from frame --template model")
    data = dataset("m")
    tokens = data.tokenize(tokenizer, 4096)
    assert tokens["input_ids"][0].count(tokenizer.bos_token_id) == 1  # template's BOS not doubled
    assert spans(data, tokenizer) == ("[user] Machine Learning[assistant] ", "a glowing brain<|eos|>")
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert tokenizer.bos_token + data.template.prompt_text("hi") == expected
    # chat rebuilds the template from what run.json records, without the tokenizer
    from ipylora.engine.templates import get_template

    record = data.describe()
    assert record["template_name"] == "model"
    assert get_template(record["template"]).prompt_text("hi") == data.template.prompt_text("hi")


def test_splits_shuffle_limit(shell, tmp_path):
    shell.user_ns["frame"] = pd.DataFrame({"q": [f"q{i}" for i in range(50)], "a": [f"a{i}" for i in range(50)]})
    shell.run_line_magic("lora_dataset", "spl --from frame --eval 0.2")
    data = dataset("spl")
    splits = data.splits()
    assert set(splits) == {"train", "eval"} and len(splits["train"]) == 40 and len(splits["eval"]) == 10
    assert not set(splits["train"].frame.q) & set(splits["eval"].frame.q)
    assert list(splits["train"].frame.q) == sorted(splits["train"].frame.q, key=lambda s: int(s[1:]))  # order kept
    held_out = list(splits["eval"].frame.q)
    shell.run_line_magic("lora_dataset", "spl --from frame --eval 0.2")
    assert list(dataset("spl").splits()["eval"].frame.q) == held_out  # seeded
    shell.run_line_magic("lora_dataset", "spl --from frame --eval 0.2 --seed 7")
    assert list(dataset("spl").splits()["eval"].frame.q) != held_out
    shell.run_line_magic("lora_dataset", "lim --from frame --shuffle --limit 5")
    limited = list(dataset("lim").frame.q)
    assert len(limited) == 5 and limited != [f"q{i}" for i in range(5)] and "eval" not in dataset("lim").splits()
    shell.run_line_magic("lora_dataset", "lim --from frame --shuffle --limit 5")
    assert list(dataset("lim").frame.q) == limited
    pd.DataFrame({"q": ["x"], "a": ["y"]}).to_csv(tmp_path / "eval.csv", index=False)
    shell.run_line_magic("lora_dataset", "evl --from frame --eval-from eval.csv")
    assert len(dataset("evl")) == 50 and list(dataset("evl").splits()["eval"].frame.q) == ["x"]
    assert dataset("evl").describe()["eval_rows"] == 1


def test_preview_shows_loss_spans_histogram_and_warnings(shell, capsys, tiny_tokenizer):
    from ipylora.ui.preview import dataset_preview

    long = " ".join(["word"] * 200)
    shell.user_ns["frame"] = pd.DataFrame({"q": ["a", "a", "b", "c", "d"], "a": ["x", "x", "", long, "bad \ufffd byte"]})
    capsys.readouterr()
    shell.run_line_magic("lora_dataset", "p --from frame --max-length 64 --show 2")
    text = capsys.readouterr().out
    assert "[x<|eos|>]" in text  # the trained span of sample 1, bracketed in the text twin
    html = dataset_preview(dataset("p"), tiny_tokenizer, "tiny", 64, samples=2)._repr_html_()
    assert 'background:#dff3e3;color:#0b5d1e">x&lt;|eos|&gt;</span>' in html
    assert '<span style="color:#888">' in html and "<svg" in html and "max-length 64" in html
    assert "1 row(s) (20.0%) over --max-length 64" in html
    for needle in ("1 row(s) have an empty response", "1 duplicate row(s)", "are longer than --max-length 64",
                   "not valid UTF-8"):
        assert needle in html, needle
    assert "<table" in html


def test_preview_of_large_data_samples_lengths(tiny_tokenizer):
    from ipylora.engine import DataArgs
    from ipylora.engine.data import LoraDataset
    from ipylora.engine.stats import dataset_stats

    frame = pd.DataFrame({"q": [f"question {i}" for i in range(3000)], "a": ["short"] * 2999 + [" ".join(["w"] * 300)]})
    stats = dataset_stats(LoraDataset("big", frame, DataArgs()), tiny_tokenizer, "tiny", 128, sample_size=500)
    assert stats.measured == 500 and stats.estimated and stats.rows == 3000


def test_head_peeks_at_a_file(shell, capsys, tmp_path):
    pd.DataFrame({"q": [f"q{i}" for i in range(100)], "a": ["x"] * 100}).to_parquet(tmp_path / "big.parquet")
    capsys.readouterr()
    shell.run_line_magic("lora_dataset", "big.parquet --head 3")
    out = capsys.readouterr().out
    assert "big.parquet: 100 rows" in out and "q2" in out and "q3" not in out
    from ipylora.engine import get_session

    assert not get_session().datasets
