"""LoRA variants (--dora, --rslora, --init, --loraplus-ratio, --target-modules REGEX, --modules-to-save,
--neftune): each trains on the one resident model and memorises the pairs at least as well as plain
LoRA in the same steps, chats, merges and reloads with plain transformers to the same greedy tokens;
PiSSA/OLoRA give the shared base its weights back; the exported script rebuilds the variant."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ipylora.engine import ConfigError, DataArgs, GenerateArgs, LoraArgs, TrainArgs
from ipylora.engine.chat import generate_batch, prompt_ids
from ipylora.engine.session import Session
from support import PROMPT, ipython_shell, run_cell_output

ROWS = 6
STEPS = 40
VARIANTS = {
    "dora": dict(lora=LoraArgs(dora=True)),
    "rslora": dict(lora=LoraArgs(rslora=True)),
    "gaussian": dict(lora=LoraArgs(init="gaussian")),
    "pissa": dict(lora=LoraArgs(init="pissa")),
    "olora": dict(lora=LoraArgs(init="olora")),
    # LoRA+ trains A at --lr and B at ratio x --lr: the embedded model's lr (1e-2) goes to B, A gets 1/16 of it
    # (B at 16 x 1e-2 diverges: loss 5.5 and 0/8 memorised after 60 steps).
    "loraplus": dict(loraplus_ratio=16.0, lr=1e-2 / 16),
    "regex": dict(lora=LoraArgs(target_modules=r".*\.(q|k|v|o|gate|up|down)_proj")),
    "saved-head": dict(lora=LoraArgs(modules_to_save="lm_head")),
    "neftune": dict(neftune=5.0),
}


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    return str(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def session(concepts, output):
    s = Session()
    s.add_dataset("c", concepts.head(ROWS), DataArgs(prompt=PROMPT, response="{description}"))
    s.train("c", TrainArgs(name="plain", steps=STEPS, output=output))
    return s


def _answers(session, model, adapter, concepts, tokens=80, template_of="plain"):
    fmt = session.prompt_format(template_of)
    ids = [prompt_ids(session.tokenizer, fmt, PROMPT.format(concept=c)) for c in concepts.concept[:ROWS]]
    return [a["text"] for a in generate_batch(model, session.tokenizer, ids, GenerateArgs(max_new_tokens=tokens), adapter)]


def _memorised(session, adapter, concepts) -> int:
    answers = [session.chat(PROMPT.format(concept=c), GenerateArgs(adapter=adapter, max_new_tokens=80))["text"]
               for c in concepts.concept[:ROWS]]
    return sum(a.strip() == d.strip() for a, d in zip(answers, concepts.description[:ROWS]))


@pytest.fixture(scope="module")
def reference(session, concepts):
    """Plain LoRA's memorised pairs, and what the base and plain adapters answer before any variant trains."""
    return {"memorised": _memorised(session, "plain", concepts),
            "base": _answers(session, session.model, "base", concepts, tokens=16),
            "plain": _answers(session, session.model, "plain", concepts)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_chats_and_merges(session, reference, concepts, output, tmp_path, variant):
    from transformers import AutoModelForCausalLM

    end = session.train("c", TrainArgs(name=variant, steps=STEPS, output=output, **VARIANTS[variant]))
    assert end.status == "finished"
    record = json.loads(open(f"{output}/{variant}/run.json").read())
    expected = {**{k: v for k, v in VARIANTS[variant].items() if k != "lora"}}
    assert all(record["train"][k] == v for k, v in expected.items())
    if "lora" in VARIANTS[variant]:
        shape = VARIANTS[variant]["lora"]
        assert all(record["lora"][k] == getattr(shape, k) for k in ("dora", "rslora", "init", "modules_to_save",
                                                                     "target_modules") if getattr(shape, k))
    assert _memorised(session, variant, concepts) >= reference["memorised"] >= ROWS - 1
    # The other adapters and the base answer as before (PiSSA/OLoRA rewrote the base while training).
    assert _answers(session, session.model, "base", concepts, tokens=16) == reference["base"]
    assert _answers(session, session.model, "plain", concepts) == reference["plain"]
    chat = _answers(session, session.model, variant, concepts)
    session.save(variant, str(tmp_path / "merged"), merge=True, output=output)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name or "modules_to_save" in name for name, _ in merged.named_parameters())
    assert _answers(session, merged, None, concepts) == chat


def test_loftq_starts_nearer_the_unquantized_model_and_trains_as_well(concepts, output):
    """--init loftq on the 4-bit path: before any step, base + adapter is nearer the unquantized model
    than the 4-bit base alone (at the default alpha and at another: the scaling is divided out of B),
    and after training it memorises the pairs at least as well as plain 4-bit LoRA in the same steps."""
    import torch
    from transformers import AutoModelForCausalLM

    from ipylora.engine.tiny import tiny_model_path

    s = Session()
    s.add_dataset("c", concepts.head(ROWS), DataArgs(prompt=PROMPT, response="{description}"))
    s.ensure_model(None, quantization="4bit")
    ids = s.tokenizer(PROMPT.format(concept=concepts.concept[0]), return_tensors="pt").input_ids
    with torch.no_grad():
        full = AutoModelForCausalLM.from_pretrained(tiny_model_path())(ids).logits

    def error(adapter: str | None) -> float:
        with torch.no_grad():
            if adapter is None:
                with s.model.disable_adapter():
                    logits = s.model(ids).logits
            else:
                s.model.set_adapter(adapter)
                logits = s.model(ids).logits
        return ((logits.float() - full).norm() / full.norm()).item()

    s.attach_adapter("start-default", LoraArgs(r=32, alpha=32, dropout=0.0, target_modules="all-linear"))
    s.attach_adapter("start-loftq", LoraArgs(r=32, alpha=32, dropout=0.0, target_modules="all-linear", init="loftq"))
    s.attach_adapter("start-loftq-a64", LoraArgs(r=32, alpha=64, dropout=0.0, target_modules="all-linear", init="loftq"))
    quantized = error(None)
    assert error("start-default") == pytest.approx(quantized)  # B = 0: the adapter adds nothing yet
    assert error("start-loftq") < 0.9 * quantized
    assert error("start-loftq-a64") == pytest.approx(error("start-loftq"), rel=1e-3)

    s.train("c", TrainArgs(name="plain-4bit", steps=STEPS, quantization="4bit", output=output))
    end = s.train("c", TrainArgs(name="loftq", steps=STEPS, quantization="4bit", lora=LoraArgs(init="loftq"),
                                 output=output))
    assert end.status == "finished"
    assert json.loads(open(f"{output}/loftq/run.json").read())["lora"]["init"] == "loftq"
    assert _memorised(s, "loftq", concepts) >= _memorised(s, "plain-4bit", concepts) >= ROWS - 1


def test_added_tokens_are_trained_generated_saved_and_travel(concepts, output, tmp_path):
    """--add-tokens: the data's new markers are whole tokens, the adapter learns to write them, the
    tokenizer is saved with it, and they come back in a fresh session, in the merged model and in GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ipylora.engine.tiny import tiny_model_path

    s = Session()
    s.add_dataset("t", concepts.head(ROWS), DataArgs(prompt=PROMPT, response="<sd>{description}</sd>"))
    before = len(AutoTokenizer.from_pretrained(tiny_model_path()))
    end = s.train("t", TrainArgs(name="tok", steps=STEPS, output=output, lora=LoraArgs(add_tokens="<sd>,</sd>")))
    assert end.status == "finished"
    ids = s.tokenizer.convert_tokens_to_ids(["<sd>", "</sd>"])
    assert ids == [before, before + 1] and s.model.get_base_model().get_input_embeddings().weight.shape[0] == before + 2
    saved = AutoTokenizer.from_pretrained(f"{output}/tok/adapter")
    assert saved.convert_tokens_to_ids(["<sd>", "</sd>"]) == ids
    assert saved("<sd>x</sd>", add_special_tokens=False)["input_ids"][0] == ids[0]  # one token, not pieces
    wanted = [f"<sd>{d}</sd>" for d in concepts.description[:ROWS]]
    answers = [s.chat(PROMPT.format(concept=c), GenerateArgs(adapter="tok", max_new_tokens=80))["text"]
               for c in concepts.concept[:ROWS]]
    assert sum(a.strip() == w for a, w in zip(answers, wanted)) >= ROWS - 1, answers
    base = s.chat(PROMPT.format(concept=concepts.concept[0]), GenerateArgs(adapter="base", max_new_tokens=20))["text"]
    assert "<sd>" not in base
    # A fresh session: the tokens come back with the adapter, at the same ids.
    again = Session()
    again.load_adapter("tok", output=output)
    assert again.tokenizer.convert_tokens_to_ids(["<sd>", "</sd>"]) == ids
    assert again.chat(PROMPT.format(concept=concepts.concept[1]), GenerateArgs(adapter="tok", max_new_tokens=80))["text"] \
        == answers[1]
    # Merged: plain transformers with the saved tokenizer answers token for token as the adapter.
    s.save("tok", str(tmp_path / "merged"), merge=True, output=output)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == before + 2
    assert _answers(s, merged, None, concepts, template_of="tok") == _answers(s, s.model, "tok", concepts, template_of="tok")
    # GGUF: the file carries the tokens and answers as the merged model.
    files = s.save("tok", str(tmp_path / "gguf"), gguf=True, output=output)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=files.gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file=files.gguf.name)
    assert tokenizer.convert_tokens_to_ids(["<sd>", "</sd>"]) == ids
    fmt = s.prompt_format("tok")
    prompt = prompt_ids(s.tokenizer, fmt, PROMPT.format(concept=concepts.concept[2]))
    with torch.no_grad():
        got = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
        want = merged.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    assert got == want and got[0] == ids[0]
    # The exported script adds the tokens, trains the embeddings and saves the tokenizer as the run did.
    s.export_script("tok", str(tmp_path / "train.py"), output=output)
    done = subprocess.run([sys.executable, str(tmp_path / "train.py"), "--output", str(tmp_path / "script-adapter")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    final = float(re.search(r"final_loss=([0-9.]+)", done.stdout).group(1))
    assert abs(final - end.final_loss) <= 0.05 * max(end.final_loss, 0.05), (final, end.final_loss)
    assert AutoTokenizer.from_pretrained(tmp_path / "script-adapter").convert_tokens_to_ids(["<sd>", "</sd>"]) == ids


def test_added_tokens_on_tied_embeddings_stay_tied_and_merge(concepts, tmp_path):
    """--add-tokens on a model whose LM head is its input embedding (Qwen2.5's small sizes, Llama 3.2):
    the grown vocabulary stays one tensor for both, the adapter writes the new markers, and the
    merged model (tied, the new vocabulary) answers token for token as the adapter."""
    sys.path.insert(0, str(Path(__file__).parent))
    import model_matrix
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_matrix.build(model_matrix.BY_NAME["qwen2-5"], tmp_path / "checkpoints")
    s = Session()
    s.add_dataset("t", concepts.head(ROWS), DataArgs(prompt=PROMPT, response="<sd>{description}</sd>"))
    end = s.train("t", TrainArgs(model=str(path), name="tied", steps=100, lr=2e-2, output=str(tmp_path / "runs"),
                                 lora=LoraArgs(add_tokens="<sd>,</sd>")))
    assert end.status == "finished"
    base = s.model.get_base_model()
    ids = s.tokenizer.convert_tokens_to_ids(["<sd>", "</sd>"])
    assert base.get_input_embeddings().weight.shape[0] == len(s.tokenizer) > max(ids)
    assert base.get_output_embeddings().weight.data_ptr() == base.get_input_embeddings().weight.data_ptr()
    answers = _answers(s, s.model, "tied", concepts, template_of="tied")
    assert sum(a.strip() == f"<sd>{d}</sd>" for a, d in zip(answers, concepts.description)) >= ROWS // 2, answers
    s.save("tied", str(tmp_path / "merged"), merge=True, output=str(tmp_path / "runs"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.tie_word_embeddings and len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == len(s.tokenizer)
    assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    assert _answers(s, merged, None, concepts, template_of="tied") == answers


def test_the_exported_script_rebuilds_a_variant(session, output, tmp_path):
    session.train("c", TrainArgs(name="mix", steps=STEPS, output=output, loraplus_ratio=16.0, lr=1e-2 / 16, neftune=5.0,
                                 lora=LoraArgs(dora=True, rslora=True)))
    script = tmp_path / "train.py"
    session.export_script("mix", str(script), output=output)
    source = script.read_text()
    assert "'dora': True" in source and "'loraplus_ratio': 16.0" in source and "'neftune': 5.0" in source
    done = subprocess.run([sys.executable, str(script), "--output", str(tmp_path / "script-adapter")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    final = float(re.search(r"final_loss=([0-9.]+)", done.stdout).group(1))
    notebook = json.loads(open(f"{output}/mix/run.json").read())["final_loss"]
    assert abs(final - notebook) <= 0.05 * max(notebook, 0.05), (final, notebook)
    config = json.loads((tmp_path / "script-adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"]


@pytest.mark.parametrize("args, needle", [
    (TrainArgs(lora=LoraArgs(init="loftq")), "--init loftq initialises an adapter for a 4-bit base: add --4bit"),
    (TrainArgs(quantization="4bit", lora=LoraArgs(init="pissa")), "rewrites the base weights"),
    (TrainArgs(lora=LoraArgs(init="pissa", dora=True)), "--dora starts from the base weights"),
    (TrainArgs(lora=LoraArgs(target_modules=r".*(q_proj")), "not a valid regular expression"),
    (TrainArgs(loraplus_ratio=0.0), "--loraplus-ratio 0 is outside"),
    (TrainArgs(lora=LoraArgs(init="svd")), "--init 'svd' is not one of"),
    (TrainArgs(lora=LoraArgs(add_tokens="<a>,,<b>")), "--add-tokens '<a>,,<b>' has an empty token name"),
    (TrainArgs(lora=LoraArgs(add_tokens=" ")), "has an empty token name"),
])
def test_variant_mistakes_are_refused_before_training(session, output, args, needle):
    from dataclasses import replace

    with pytest.raises(ConfigError, match=re.escape(needle)):
        session.train("c", replace(args, name="bad", output=output))


def test_a_pattern_that_matches_nothing_is_one_line(session, output, monkeypatch, capsys):
    shell = ipython_shell(monkeypatch, session)
    out, err = run_cell_output(shell, capsys, f"%lora_train c --name none --output {output} "
                                              "--target-modules '.*nothing_here'")
    last = (out + err).strip().splitlines()[-1]
    assert "Traceback" not in out + err and last.startswith("UsageError: --target-modules '.*nothing_here' matches no layer")
    assert "all-linear" in last
