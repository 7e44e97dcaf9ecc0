"""%lora_save (PEFT adapter, merged model, 4-bit base dequantized) and %lora_export (a standalone script)."""

import json
import re
import subprocess
import sys

import pytest

from ipylora.engine import DataArgs, GenerateArgs, TrainArgs
from ipylora.engine.chat import generate_batch, prompt_ids
from ipylora.engine.session import Session
from support import PROMPT, assert_one_line_error, ipython_shell

ROWS = 12


@pytest.fixture(scope="module")
def session(concepts, tmp_path_factory):
    s = Session()
    s.add_dataset("c", concepts.head(ROWS), DataArgs(prompt=PROMPT, response="{description}"))
    s.train("c", TrainArgs(name="small", steps=40, output=str(tmp_path_factory.mktemp("runs"))))
    return s


@pytest.fixture
def shell(session, monkeypatch):
    return ipython_shell(monkeypatch, session)


def _greedy(session, model, adapter, concepts, tokens=60):
    fmt = session.prompt_format("small")
    ids = [prompt_ids(session.tokenizer, fmt, PROMPT.format(concept=c)) for c in concepts.concept[:ROWS]]
    return [a["text"] for a in generate_batch(model, session.tokenizer, ids, GenerateArgs(max_new_tokens=tokens), adapter)]


def test_saved_adapter_is_plain_peft(shell, session, concepts, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    shell.run_line_magic("lora_save", f"small {tmp_path / 'adapter'}")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(session.model_source), str(tmp_path / "adapter"))
    assert _greedy(session, model, None, concepts) == _greedy(session, session.model, "small", concepts)


def test_merged_model_loads_without_peft_and_answers_the_same(shell, session, concepts, tmp_path):
    from transformers import AutoModelForCausalLM

    shell.run_line_magic("lora_save", f"small {tmp_path / 'merged'} --merge")
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert "adapter_config.json" not in files and "model.safetensors" in files and "tokenizer.json" in files
    # By default the merged weights keep the precision the run trained in (float32 on this CPU).
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == session.precision.dtype
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    expected = _greedy(session, session.model, "small", concepts)
    assert _greedy(session, merged, None, concepts) == expected
    assert sum(a == d for a, d in zip(expected, concepts.description)) >= ROWS // 2  # it is a trained adapter
    # bf16 halves the files; rounding may flip a near-tie token, but the answers stay the adapter's.
    shell.run_line_magic("lora_save", f"small {tmp_path / 'merged16'} --merge --dtype bf16")
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "merged16")
    assert half.dtype.__str__() == "torch.bfloat16"
    assert sum(a == b for a, b in zip(_greedy(session, half, None, concepts), expected)) >= ROWS * 2 // 3


def test_merge_of_a_4bit_run_dequantizes_the_base(concepts, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    q = Session()
    q.add_dataset("c", concepts.head(4), DataArgs(prompt=PROMPT, response="{description}"))
    q.train("c", TrainArgs(name="q4", steps=8, quantization="4bit", output=str(tmp_path / "runs")))
    q.save("q4", tmp_path / "merged", merge=True, dtype="fp32", output=str(tmp_path / "runs"))
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    fmt = q.prompt_format("q4")
    ids = [prompt_ids(q.tokenizer, fmt, PROMPT.format(concept=c)) for c in concepts.concept[:4]]
    args = GenerateArgs(max_new_tokens=30)
    expected = [a["text"] for a in generate_batch(q.model, q.tokenizer, ids, args, "q4")]
    assert [a["text"] for a in generate_batch(merged, q.tokenizer, ids, args)] == expected


def test_exported_script_reproduces_the_run(shell, session, tmp_path, capsys):
    script = tmp_path / "export" / "train.py"
    shell.run_line_magic("lora_export", f"small --script {script}")
    assert "train.data.jsonl" in capsys.readouterr().out
    source = script.read_text()
    assert not re.search(r"^\s*(import|from) ipylora", source, re.M)
    rows = (tmp_path / "export" / "train.data.jsonl").read_text().splitlines()
    assert len(rows) == ROWS and set(json.loads(rows[0])) == {"concept", "description"}
    done = subprocess.run([sys.executable, str(script), "--output", str(tmp_path / "script-adapter")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    final = float(re.search(r"final_loss=([0-9.]+)", done.stdout).group(1))
    notebook = json.loads((session.adapters["small"].run_dir / "run.json").read_text())["final_loss"]
    assert abs(final - notebook) <= 0.05 * notebook, (final, notebook)
    assert "{'loss'" not in done.stdout and len(re.findall(r"^step \d+/40 ", done.stdout, re.M)) == 10
    assert (tmp_path / "script-adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("line, needle", [
    ("%lora_save ghost out", "No run in"),
    ("%lora_save small out --merge --dtype int3", "--dtype 'int3'"),
    ("%lora_export small", "--script"),
    ("%lora_export small --script t.py --data missing.csv", "does not exist"),
])
def test_export_mistakes_are_one_line(shell, capsys, line, needle):
    assert_one_line_error(shell, capsys, line, needle)
