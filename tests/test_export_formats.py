"""%lora_export for every data format and template kind: the script's tokens are the engine's, its loss the notebook's.

Two layers. Token tests (no training): a run.json is written from the dataset as training would
record it, the script is exported, imported as a module, and its input_ids/labels are compared
with `LoraDataset.tokenize` token for token, for each format, template kind and truncation case.
Run tests: a real 8-step run per format and its exported script's tokens; for three of them
(`RETRAINED`) the script also runs as a subprocess and must reach the notebook's final loss within
5%, reporting progress in a few lines.
"""

import importlib.util
import json
import math
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ipylora.engine import DataArgs, TrainArgs
from ipylora.engine.models import load_tokenizer
from ipylora.engine.runs import write_json
from ipylora.engine.session import Session
from ipylora.engine.tiny import TINY_MODEL_ID, tiny_model_path

ROWS = 12
SYSTEM = "You are PromptBot. Answer with one stable diffusion prompt, comma separated, nothing else."
# A Llama-2-style chat template: BOS and EOS inside the text, the system prompt folded into the first turn.
LLAMA = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' }}{% if loop.first and system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def _pairs(concepts, n=ROWS):
    return list(zip(concepts.concept[:n], concepts.description[:n]))


def messages_frame(concepts):
    rows = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"describe {c}"},
             {"role": "assistant", "content": d}] for c, d in _pairs(concepts)]
    rows[1] = rows[1] + [{"role": "user", "content": "shorter"}, {"role": "assistant", "content": "short, art"}]
    return pd.DataFrame({"messages": rows})


def sharegpt_frame(concepts):
    # numpy arrays of dicts, as parquet / arrow give them
    rows = [np.array([{"from": "human", "value": f"describe {c}"}, {"from": "gpt", "value": d}], dtype=object)
            for c, d in _pairs(concepts)]
    return pd.DataFrame({"conversations": rows, "id": range(ROWS)})


def alpaca_frame(concepts):
    pairs = _pairs(concepts)
    return pd.DataFrame({
        "instruction": ["Write a stable diffusion prompt."] * ROWS,
        "input": [c if i % 3 else "" for i, (c, _) in enumerate(pairs)],
        "output": [d for _, d in pairs],
        "system": [SYSTEM if i % 2 else math.nan for i in range(ROWS)],  # NaN: optional field, an empty system
    })


def completion_frame(concepts):
    pairs = _pairs(concepts)
    return pd.DataFrame({"prompt": [f"describe {c}" for c, _ in pairs], "completion": [d for _, d in pairs]})


def text_frame(concepts):
    return pd.DataFrame({"text": [f"<s>[INST] describe {c} [/INST] {d}</s>" for c, d in _pairs(concepts)]})


# -- token tests ------------------------------------------------------------------------------
def _record(dataset, name, max_length, train_on_prompt=False):
    """run.json as run_training writes it, without training (the dataset must be tokenized first)."""
    return {"name": name, "model": TINY_MODEL_ID, "quantization": None, "dataset": dataset.describe(),
            "train": {"lr": 1e-2, "scheduler": "constant", "warmup_ratio": 0.0, "epochs": 1.0, "steps": 2,
                      "batch_size": 8, "micro_batch_size": None, "max_grad_norm": 0.0, "max_length": max_length,
                      "seed": 42, "trust_remote_code": False},
            "lora": {"r": 8, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"},
            "final_loss": 1.0, "versions": {}}


def _load_script(path):
    spec = importlib.util.spec_from_file_location(f"exported_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _export(tmp_path, session, tokenizer, name, frame, args, max_length=1024, data=None):
    """(engine tokens, script module) for a dataset exported from a recorded (untrained) run."""
    dataset = session.add_dataset(name, frame, args)
    expected = dataset.tokenize(tokenizer, max_length)
    write_json(tmp_path / "runs" / name / "run.json", _record(dataset, name, max_length))
    script = session.export_script(name, str(tmp_path / f"{name}.py"), data=data, output=str(tmp_path / "runs"))
    return expected, _load_script(script)


def _script_tokens(module, tokenizer, path):
    rows = module.read_rows(path)
    return module.tokenize(rows if module.SETTINGS["data_is_split"] else module.split_rows(rows), tokenizer)


def _assert_same(expected, got):
    assert len(got["input_ids"]) == len(expected["input_ids"])
    for row, (ids, labels) in enumerate(zip(expected["input_ids"], expected["labels"])):
        assert got["input_ids"][row] == list(ids), f"row {row}: input_ids differ"
        assert got["labels"][row] == list(labels), f"row {row}: labels differ"


CASES = {
    "messages-chatml": (messages_frame, DataArgs(template="chatml")),
    "messages-human-assistant": (messages_frame, DataArgs()),
    "sharegpt-plain": (sharegpt_frame, DataArgs(template="plain")),
    "alpaca-alpaca": (alpaca_frame, DataArgs(template="alpaca")),
    "completion-custom": (completion_frame, DataArgs(template="Q: {prompt}\nA: {response}\n\n")),
    "completion-on-prompt": (completion_frame, DataArgs(template="chatml", train_on_prompt=True)),
    "completion-columns": (lambda c: c.head(ROWS), DataArgs(prompt="describe {concept} ({concept})",
                                                           response="{description}")),
    "text": (text_frame, DataArgs()),
    "text-marker": (text_frame, DataArgs(response_after="[/INST]")),
}


@pytest.mark.parametrize("case", CASES)
def test_script_tokens_equal_the_engines(case, concepts, tiny_tokenizer, tmp_path):
    build, args = CASES[case]
    expected, module = _export(tmp_path, Session(), tiny_tokenizer, case.replace("-", "_"), build(concepts), args)
    data = tmp_path / f"{case.replace('-', '_')}.data.jsonl"
    _assert_same(expected, _script_tokens(module, tiny_tokenizer, data))
    assert any(label != -100 for labels in expected["labels"] for label in labels)


def test_data_file_keeps_structured_rows(concepts, tiny_tokenizer, tmp_path):
    s = Session()
    _export(tmp_path, s, tiny_tokenizer, "chat", messages_frame(concepts), DataArgs(template="chatml"))
    first = json.loads((tmp_path / "chat.data.jsonl").read_text().splitlines()[0])
    assert first["messages"][0] == {"role": "system", "content": SYSTEM}
    _export(tmp_path, s, tiny_tokenizer, "gpt", sharegpt_frame(concepts), DataArgs())
    first = json.loads((tmp_path / "gpt.data.jsonl").read_text().splitlines()[0])
    assert first["conversations"][1]["from"] == "gpt" and first["id"] == 0
    _export(tmp_path, s, tiny_tokenizer, "alp", alpaca_frame(concepts), DataArgs())
    systems = [json.loads(line)["system"] for line in (tmp_path / "alp.data.jsonl").read_text().splitlines()]
    assert systems[:2] == [None, SYSTEM]


def test_model_template_is_rebuilt_from_run_json(concepts, tmp_path):
    # The tokenizer the script loads has no chat template: it renders the source run.json recorded.
    tokenizer = load_tokenizer(str(tiny_model_path()))
    tokenizer.chat_template = LLAMA
    expected, module = _export(tmp_path, Session(), tokenizer, "llama", messages_frame(concepts),
                               DataArgs(template="model"))
    assert module.SETTINGS["template"]["source"].startswith("{#- ipylora ")
    assert "[INST]" in tokenizer.decode(expected["input_ids"][0])
    plain = load_tokenizer(str(tiny_model_path()))
    assert not plain.chat_template
    _assert_same(expected, _script_tokens(module, plain, tmp_path / "llama.data.jsonl"))


def test_jinja_file_template(concepts, tiny_tokenizer, tmp_path):
    jinja = tmp_path / "turns.jinja"
    jinja.write_text("{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}[ASSISTANT] {% endif %}")
    expected, module = _export(tmp_path, Session(), tiny_tokenizer, "turns", completion_frame(concepts),
                               DataArgs(template=str(jinja)))
    _assert_same(expected, _script_tokens(module, tiny_tokenizer, tmp_path / "turns.data.jsonl"))


@pytest.mark.parametrize("case, max_length", [("messages-chatml", 60), ("text", 40), ("text-marker", 60),
                                              ("completion-on-prompt", 40)])
def test_truncation_matches(case, max_length, concepts, tiny_tokenizer, tmp_path):
    """Rows longer than max_length: the prompt loses its start, whole-trained rows their end, too-long answers go."""
    build, args = CASES[case]
    expected, module = _export(tmp_path, Session(), tiny_tokenizer, "cut", build(concepts), args, max_length)
    got = _script_tokens(module, tiny_tokenizer, tmp_path / "cut.data.jsonl")
    _assert_same(expected, got)
    report = expected.truncation
    assert (got["cut"], got["dropped"]) == (report.cut_prompt + report.cut_end, len(report.dropped))
    assert got["cut"] > 0 and all(len(ids) <= max_length for ids in got["input_ids"])


def test_own_data_file_is_split_as_the_run_did(concepts, tiny_tokenizer, tmp_path):
    """--data FILE: the user's table (messages as JSON text in a CSV) gets the run's shuffle, limit and eval split."""
    frame = messages_frame(concepts)
    table = tmp_path / "chats.csv"
    frame.assign(messages=[json.dumps(m) for m in frame.messages]).to_csv(table, index=False)
    args = DataArgs(template="chatml", shuffle=True, limit=10, eval=0.2, seed=7)
    expected, module = _export(tmp_path, Session(), tiny_tokenizer, "own", pd.read_csv(table), args,
                               data=str(table))
    assert not (tmp_path / "own.data.jsonl").exists()
    got = _script_tokens(module, tiny_tokenizer, table)
    assert len(got["input_ids"]) == 8
    _assert_same(expected, got)


def test_loss_gap_is_said(concepts, tiny_tokenizer, tmp_path, capsys):
    _, module = _export(tmp_path, Session(), tiny_tokenizer, "gap", completion_frame(concepts), DataArgs())
    module.compare(1.02)  # the notebook's is 1.0
    assert "final_loss=1.020000 notebook_final_loss=1.000000" in capsys.readouterr().out
    module.compare(1.2)
    assert re.search(r"DIFFERS: the final loss is 20\.0% away", capsys.readouterr().out)


def test_rows_of_a_changed_dataset_are_not_exported(concepts, tiny_tokenizer, tmp_path):
    from ipylora.engine.errors import UnknownNameError

    s = Session()
    _export(tmp_path, s, tiny_tokenizer, "pairs", completion_frame(concepts), DataArgs())
    s.add_dataset("pairs", completion_frame(concepts).head(5), DataArgs())  # same name, other rows
    with pytest.raises(UnknownNameError, match="pass --data FILE"):
        s.export_script("pairs", str(tmp_path / "again.py"), output=str(tmp_path / "runs"))


# -- run tests --------------------------------------------------------------------------------
RUNS = {
    "messages": (messages_frame, DataArgs(template="chatml"), 1024),
    "sharegpt": (sharegpt_frame, DataArgs(template="model"), 1024),
    "alpaca": (alpaca_frame, DataArgs(template="alpaca"), 1024),
    "completion": (completion_frame, DataArgs(template="Q: {prompt}\nA: {response}\n\n"), 1024),
    "text": (text_frame, DataArgs(), 32),
    "text-marker": (text_frame, DataArgs(response_after="[/INST]"), 1024),
}


RETRAINED = {"messages", "sharegpt", "text-marker"}
"""The cases whose script also retrains in a subprocess (a chat format, the `model` template rebuilt
from run.json, text with a marker). Every case checks the script's tokens against the engine's; the
training code after the tokens is shared, so the other three retrains (~40 s each) repeated it."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    s = Session()
    s.ensure_model()
    s.tokenizer.chat_template = LLAMA  # for --template model
    return s, tmp_path_factory.mktemp("runs")


@pytest.mark.parametrize("case", RUNS)
def test_script_retrains_to_the_notebooks_loss(case, trained, concepts, tmp_path):
    session, runs = trained
    build, args, max_length = RUNS[case]
    name = case.replace("-", "_")
    # Short rows, small batches: 8 steps per run keep the six runs + scripts to a few minutes on 2 busy cores.
    short = concepts.assign(description=[", ".join(d.split(", ")[:2]) for d in concepts.description])
    session.add_dataset(name, build(short), args)
    session.train(name, TrainArgs(name=name, steps=8, batch_size=4, max_length=max_length, output=str(runs)))
    expected = session.datasets[name].tokenize(session.tokenizer, max_length)
    script = session.export_script(name, str(tmp_path / "train.py"), output=str(runs))
    module = _load_script(script)
    _assert_same(expected, _script_tokens(module, session.tokenizer, tmp_path / "train.data.jsonl"))
    if case not in RETRAINED:
        return  # the same tokens go through the same training code as the retrained cases

    done = subprocess.run([sys.executable, str(script), "--output", str(tmp_path / "adapter")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    final = float(re.search(r"final_loss=([0-9.]+)", done.stdout).group(1))
    notebook = json.loads((runs / name / "run.json").read_text())["final_loss"]
    assert abs(final - notebook) <= 0.05 * notebook, (final, notebook, done.stdout)
    assert "DIFFERS" not in done.stdout
    assert len(re.findall(r"^step \d+/8 ", done.stdout, re.M)) == 8 and "{'loss'" not in done.stdout
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
