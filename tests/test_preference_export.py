"""%lora_export of preference runs: the script's prompt/answer tokens are the engine's, its DPO loss the notebook's.

Token tests write a run.json as training records it (method, beta...) without training, export,
import the script and compare its `preference_tokens` with `LoraDataset.preference_tokens` /
`unpaired_tokens` token for token (text triples, TRL's conversational lists with an implicit
prompt and a system column, a long row cut by max_length, unpaired rows, KTO on paired rows).
The run test trains DPO for a few steps and retrains it with the script as a subprocess.
"""

import importlib.util
import json
import re
import subprocess
import sys

import pandas as pd
import pytest

from ipylora.engine import DataArgs, TrainArgs
from ipylora.engine.runs import write_json
from ipylora.engine.session import Session
from ipylora.engine.tiny import TINY_MODEL_ID

SYSTEM = "You answer in one short line."


def triples(concepts, n=10):
    rows = concepts.head(n)
    return pd.DataFrame({"prompt": [f"describe {c}" for c in rows.concept], "chosen": list(rows.description),
                         "rejected": [" ".join(reversed(d.split())) for d in rows.description]})


def conversational(concepts, n=8):
    """TRL's conversational preference lists: the shared leading turns are the prompt (no prompt column)."""
    rows = []
    for c, d in zip(concepts.concept[:n], concepts.description[:n]):
        head = [{"role": "user", "content": f"describe {c}"}]
        rows.append({"chosen": head + [{"role": "assistant", "content": d}],
                     "rejected": head + [{"role": "assistant", "content": "no idea"}], "system": SYSTEM})
    return pd.DataFrame(rows)


def unpaired(concepts, n=8):
    frame = triples(concepts, n // 2)
    return pd.DataFrame({"prompt": list(frame.prompt) * 2, "completion": list(frame.chosen) + list(frame.rejected),
                         "label": [True] * (n // 2) + [False] * (n // 2)})


def _record(dataset, name, method, max_length, **train):
    return {"name": name, "model": TINY_MODEL_ID, "quantization": None, "dataset": dataset.describe(),
            "train": {"lr": 5e-3, "scheduler": "constant", "warmup_ratio": 0.0, "epochs": 1.0, "steps": 2,
                      "batch_size": 4, "micro_batch_size": None, "max_grad_norm": 0.0, "max_length": max_length,
                      "seed": 42, "trust_remote_code": False, "method": method, "beta": 0.1, "loss_type": None,
                      "gamma": None, "from_adapter": None, **train},
            "lora": {"r": 8, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"},
            "final_loss": 0.69, "versions": {}}


def _load_script(path):
    spec = importlib.util.spec_from_file_location(f"exported_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _export(tmp_path, tokenizer, name, frame, args, method, max_length=1024, session=None, **train):
    session = session or Session()
    dataset = session.add_dataset(name, frame, args)
    build = dataset.unpaired_tokens if method == "kto" else dataset.preference_tokens
    expected = build(tokenizer, max_length)
    write_json(tmp_path / "runs" / name / "run.json", _record(dataset, name, method, max_length, **train))
    script = session.export_script(name, str(tmp_path / f"{name}.py"), output=str(tmp_path / "runs"))
    module = _load_script(script)
    got = module.preference_tokens(module.read_rows(tmp_path / f"{name}.data.jsonl"), tokenizer)
    return expected, got, module


def _assert_same(expected, got):
    keys = [k for k in expected if k != "truncation"]
    assert set(keys) == set(got) - {"cut", "dropped"}
    assert len(got["prompt_ids"]) == len(expected["prompt_ids"]) > 0
    for key in keys:
        for row, (want, have) in enumerate(zip(expected[key], got[key])):
            assert (list(want) if isinstance(want, list) else want) == have, f"row {row}: {key} differs"


CASES = {
    "dpo-triples": (triples, DataArgs(), "dpo"),
    "dpo-conversational-chatml": (conversational, DataArgs(template="chatml"), "dpo"),
    "simpo-custom-template": (triples, DataArgs(template="Q: {prompt}\nA: {response}\n\n"), "simpo"),
    "kto-unpaired": (unpaired, DataArgs(template="chatml"), "kto"),
    "kto-from-pairs": (triples, DataArgs(), "kto"),
}


@pytest.mark.parametrize("case", CASES)
def test_script_tokens_equal_the_engines(case, concepts, tiny_tokenizer, tmp_path):
    build, args, method = CASES[case]
    expected, got, module = _export(tmp_path, tiny_tokenizer, case.replace("-", "_"), build(concepts), args, method)
    _assert_same(expected, got)
    assert module.SETTINGS["method"] == method and module.SETTINGS["train"]["beta"] == 0.1
    eos = tiny_tokenizer.eos_token_id
    answers = got["completion_ids"] if method == "kto" else got["chosen_ids"] + got["rejected_ids"]
    assert all(ids[-1] == eos for ids in answers)  # every answer is trained up to its EOS
    if method == "kto":
        assert got["label"].count(True) == got["label"].count(False) > 0


def test_long_rows_lose_prompt_tokens_as_the_engine_cuts_them(concepts, tiny_tokenizer, tmp_path):
    frame = triples(concepts)
    frame.loc[0, "prompt"] = "describe in great detail " * 30 + frame.loc[0, "prompt"]
    frame.loc[1, "chosen"] = "far too long an answer " * 40
    expected, got, _ = _export(tmp_path, tiny_tokenizer, "cut", frame, DataArgs(), "dpo", max_length=64)
    _assert_same(expected, got)
    report = expected.truncation
    assert (got["cut"], got["dropped"]) == (report.cut_prompt, len(report.dropped))
    assert got["cut"] >= 1 and got["dropped"] >= 1 and len(got["prompt_ids"]) >= 4
    assert all(len(p) + max(len(c), len(r)) <= 64
               for p, c, r in zip(got["prompt_ids"], got["chosen_ids"], got["rejected_ids"]))


def test_data_file_keeps_preference_rows_and_the_start_adapter_is_recorded(concepts, tiny_tokenizer, tmp_path):
    s = Session()
    _export(tmp_path, tiny_tokenizer, "conv", conversational(concepts), DataArgs(template="chatml"), "dpo", session=s)
    first = json.loads((tmp_path / "conv.data.jsonl").read_text().splitlines()[0])
    assert first["chosen"][-1]["role"] == "assistant" and first["system"] == SYSTEM
    (tmp_path / "runs" / "start" / "adapter").mkdir(parents=True)
    (tmp_path / "runs" / "start" / "adapter" / "adapter_config.json").write_text("{}")
    write_json(tmp_path / "runs" / "start" / "run.json", {"name": "start"})
    _, _, module = _export(tmp_path, tiny_tokenizer, "chain", triples(concepts), DataArgs(), "dpo", session=s,
                           from_adapter="start")
    assert module.SETTINGS["from_adapter"] == str((tmp_path / "runs" / "start" / "adapter").resolve())


def test_a_plugin_method_is_refused_in_one_line(concepts, tiny_tokenizer, tmp_path):
    from ipylora.engine.errors import ConfigError

    with pytest.raises(ConfigError, match=r"plugin method 'mine'.*sft, dpo, simpo, orpo, kto"):
        _export(tmp_path, tiny_tokenizer, "plug", triples(concepts), DataArgs(), "mine")


def _retrain(session, runs, tmp_path, name):
    script = session.export_script(name, str(tmp_path / "train.py"), output=str(runs))
    done = subprocess.run([sys.executable, str(script), "--output", str(tmp_path / "adapter")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    final = float(re.search(r"final_loss=(-?[0-9.]+)", done.stdout).group(1))
    notebook = json.loads((runs / name / "run.json").read_text())["final_loss"]
    return final, notebook, done.stdout


def test_dpo_script_retrains_to_the_notebooks_loss(concepts, tmp_path):
    runs = tmp_path / "runs"
    s = Session()
    s.add_dataset("prefs", triples(concepts, 8), DataArgs())
    # A low lr keeps the loss away from 0, where a relative gap would say nothing.
    s.train("prefs", TrainArgs(name="dpo", method="dpo", steps=8, batch_size=4, lr=5e-4, output=str(runs)))
    final, notebook, out = _retrain(s, runs, tmp_path, "dpo")
    assert abs(final - notebook) <= 0.05 * abs(notebook), (final, notebook, out)
    assert 0.05 < notebook < 0.69  # it trained (DPO starts at log 2) and is not saturated
    assert "DIFFERS" not in out and len(re.findall(r"^step \d+/8 ", out, re.M)) == 8
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
