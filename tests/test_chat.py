"""Chat: the streaming widget (Send, Stop, Clear, multi-turn), --compare, prompt formats, base-model chat."""

import json
import time

import pytest

from ipylora.engine import DataArgs, GenerateArgs, SessionBusyError, TrainArgs
from ipylora.engine.chat import PromptFormat, prompt_ids
from ipylora.engine.session import Session
from support import PROMPT, assert_one_line_error, ipython_shell, run_cell_output

ROWS = 8


@pytest.fixture(scope="module")
def session(concepts, tmp_path_factory):
    """One tiny model trained once for the module: adapter "c" on 8 concept rows."""
    s = Session()
    s.add_dataset("c", concepts.head(ROWS), DataArgs(prompt=PROMPT, response="{description}"))
    s.train("c", TrainArgs(name="c", steps=80, output=str(tmp_path_factory.mktemp("runs"))))
    return s


@pytest.fixture
def shell(session, monkeypatch):
    return ipython_shell(monkeypatch, session)


def _prompt(concepts, i):
    return PROMPT.format(concept=concepts.concept[i])


def _widget(session, **kw):
    from ipylora.ui.chat_widget import ChatWidget

    return ChatWidget(session, GenerateArgs(**kw), update_every_s=0)


def test_widget_streams_the_answer_and_keeps_the_turn(session, concepts):
    widget = _widget(session, adapter="c", max_new_tokens=80)
    seen = []
    widget.reply.observe(lambda change: seen.append(change["new"]), names="value")
    widget.input.value = _prompt(concepts, 0)
    widget.send_button.click()
    widget.wait(60)
    streamed = [v for v in seen if v]
    assert len(streamed) >= 3 and len(set(streamed)) >= 3, seen
    assert all(len(a) <= len(b) for a, b in zip(streamed, streamed[1:]))  # it grows
    (user, answer), = widget.history
    assert user == _prompt(concepts, 0) and answer and answer in widget.transcript.value.replace("&#x27;", "'")
    assert widget.reply.value == "" and not widget.send_button.disabled and widget.stop_button.disabled
    # The second turn is sent after the first one, in the training layout.
    widget.send(_prompt(concepts, 1))
    widget.wait(60)
    assert len(widget.history) == 2 and widget.transcript.value.count("<b>you</b>") == 2
    widget.clear_button.click()
    assert widget.history == [] and widget.transcript.value == ""
    widget.close()


def test_stop_ends_generation_and_frees_the_model(session, concepts):
    widget = _widget(session, adapter="base", max_new_tokens=1500)
    generation = widget.send(_prompt(concepts, 0))
    with pytest.raises(SessionBusyError, match="being generated"):
        session.chat("hello", GenerateArgs(max_new_tokens=2))
    deadline = time.monotonic() + 60
    while len(widget.reply.value) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    widget.stop_button.click()
    widget.wait(60)
    assert not widget.busy and generation.result["stopped_by_user"]
    assert 0 < generation.result["tokens"] < 1500
    assert "stopped by you" in widget.status.value
    assert widget.history[0][1] == generation.result["text"]  # the partial answer is kept
    assert session.chat("hello", GenerateArgs(max_new_tokens=2))["tokens"] > 0  # the model is free again
    widget.close()


def test_adapter_dropdown_lists_base_and_adapters(session):
    widget = _widget(session)
    assert list(widget.adapter.options) == ["base", "c"] and widget.adapter.value == "c"
    assert widget.compile.disabled and not widget.compile.value  # CUDA graphs: no GPU here
    widget.close()


def test_multi_turn_prompt_repeats_the_training_layout(session, concepts):
    from ipylora.engine.data import tokenize_pairs

    tok = session.tokenizer
    fmt = session.prompt_format("c")
    first, answer, second = _prompt(concepts, 0), concepts.description[0], _prompt(concepts, 1)
    trained = tokenize_pairs([fmt.template.render(first, answer)], tok, 10**6)["input_ids"][0]
    ids = prompt_ids(tok, fmt, second, [(first, answer)])
    assert ids == trained + tok(fmt.template.prompt_text(second), add_special_tokens=False)["input_ids"]
    assert prompt_ids(tok, fmt, first) == tok(fmt.template.prompt_text(first))["input_ids"]


def test_chat_template_is_used_for_adapters_trained_with_it(session, tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    ids = prompt_ids(tok, PromptFormat("chat"), "two", [("one", "uno")])
    # Tokenized as `--template model` training tokenized it: the tokenizer's BOS, EOS after each answer.
    assert tok.decode(ids) == "<|bos|><user>one\n<assistant>uno<|eos|>\n<user>two\n<assistant>"
    run_json = session.adapters["c"].run_dir / "run.json"
    record = json.loads(run_json.read_text())
    try:
        run_json.write_text(json.dumps({**record, "dataset": {**record["dataset"], "template_name": "model"}}))
        assert session.prompt_format("c").kind == "chat"
    finally:
        run_json.write_text(json.dumps(record))
    assert session.prompt_format("c").kind == "template"


def test_compare_shows_base_and_adapter_side_by_side(shell, session, concepts, capsys):
    prompt = _prompt(concepts, 0)
    result = session.compare([prompt, _prompt(concepts, 1)], ["base", "c"], GenerateArgs(max_new_tokens=40))
    for i in range(2):
        assert result["answers"]["base"][i]["text"] != result["answers"]["c"][i]["text"]
    assert result["answers"]["c"][0]["text"] == session.chat(prompt, GenerateArgs(adapter="c", max_new_tokens=40))["text"]
    out, err = run_cell_output(shell, capsys, f"%lora_chat --compare base,c --max-new-tokens 40 {prompt}")
    # (the base's random text holds control characters that the terminal rewrites, so check a clean prefix)
    assert not err and f"base: {result['answers']['base'][0]['text'][:5]}" in out
    assert f"c: {result['answers']['c'][0]['text']}" in out
    out, err = run_cell_output(shell, capsys, "%lora_chat --compare base,c --prompts-from c --limit 3 --max-new-tokens 30")
    assert not err and out.count("## generate a stable diffusion prompt") == 3 and out.count("reference:") == 3
    out, err = run_cell_output(shell, capsys, "%lora_chat --compare base,c --prompts-from c:eval")
    assert "UsageError" in err + out and "no eval split" in err + out


def test_compile_off_cuda_says_it_was_not_used(shell, concepts, capsys):
    out, err = run_cell_output(shell, capsys, f"%lora_chat --compile --max-new-tokens 8 {_prompt(concepts, 0)}")
    # notes, on stdout (Jupyter shows stderr like an error)
    lines = out.strip().splitlines()
    assert not err and lines[-2:] == ["[no EOS: stopped at --max-new-tokens 8]", lines[-1]]
    assert lines[-1].startswith("[--compile needs a CUDA GPU")


def test_widget_without_a_notebook_and_bad_compare_are_one_line(shell, capsys):
    for line, needle in [("%lora_chat", "needs a notebook"), ("%lora_chat --compare base,ghost hi", "ghost"),
                         ("%lora_chat --trust-remote-code hi", "go with --model"),
                         ("%lora_chat --compare base,c --prompts-from c:test", "not one of")]:
        assert_one_line_error(shell, capsys, line, needle)


def _remote_code_model(tmp_path, tiny_path):
    """The tiny model re-labelled as a model type transformers does not know, with its code beside it."""
    import shutil

    folder = tmp_path / "custom-model"
    shutil.copytree(tiny_path, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="ipylora_custom", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'ipylora_custom'\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    return folder


def test_base_model_chat_needs_explicit_trust_remote_code(fresh_session, tmp_path, capsys):
    from ipylora.engine.tiny import tiny_model_path

    folder = _remote_code_model(tmp_path, tiny_model_path())
    ip = ipython_shell()
    out, err = run_cell_output(ip, capsys, f"%lora_chat --model {folder} --max-new-tokens 5 hello")
    text = (out + err).strip()
    assert text.startswith("UsageError:") and "--trust-remote-code" in text and "\n" not in text, text
    assert fresh_session.model is None
    out, err = run_cell_output(ip, capsys, f"%lora_chat --model {folder} --trust-remote-code --max-new-tokens 5 hello")
    assert out.strip() and "Error" not in err
    assert type(fresh_session.model).__name__ == "CustomForCausalLM" and not fresh_session.adapters


def test_the_captured_step_gets_ligers_kernels_unless_compiled(monkeypatch, tiny_tokenizer):
    """Chat on a GPU applies Liger's fused kernels to the resident model as training does (they
    decode 28% faster), once per base model; --compile's whole-step compile is left as it was."""
    from transformers import AutoModelForCausalLM

    from ipylora.engine import chat, graphdecode, speed
    from ipylora.engine.tiny import tiny_model_path

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path())
    applied = []
    monkeypatch.setattr(graphdecode, "usable", lambda m: True)  # as on CUDA
    monkeypatch.setattr(speed, "_liger_once", lambda base, notes: applied.append(base))
    monkeypatch.setattr(graphdecode, "decode", lambda *args, **kwargs: [tiny_tokenizer.eos_token_id])
    chat.generate(model, tiny_tokenizer, "hi", GenerateArgs(max_new_tokens=2))
    assert applied == []  # a CPU model: Liger's Triton kernels would fail on it
    monkeypatch.setattr(chat, "_is_cuda", lambda m: True)
    chat.generate(model, tiny_tokenizer, "hi", GenerateArgs(max_new_tokens=2, compile=True))
    assert applied == []
    chat.generate(model, tiny_tokenizer, "hi", GenerateArgs(max_new_tokens=2))
    assert applied == [model]


def test_liger_style_module_patches_stay_on_the_instance_and_off_the_cpu(monkeypatch):
    """speed.instance_only: what Liger's apply functions change in a family's modeling module (its
    RMSNorm class, the rotary function) is undone on leaving, the function kept for CUDA tensors
    only, so a model of that family made later on the CPU runs as before (on a GPU machine it hit
    Liger's Triton kernels: "Pointer argument cannot be accessed from Triton (cpu tensor?)")."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    from ipylora.engine import speed
    from ipylora.engine.tiny import tiny_model_path

    norm, rotary = modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb
    monkeypatch.setattr(modeling_llama, "LlamaRMSNorm", norm)  # put back after the test whatever happens
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", rotary)

    def cuda_only(*args, **kwargs):
        raise AssertionError("the CUDA kernel ran on a CPU tensor")

    torch.manual_seed(0)
    ids = torch.randint(5, 500, (1, 10))
    before = AutoModelForCausalLM.from_pretrained(tiny_model_path())(input_ids=ids).logits
    for _ in range(2):  # a second base model of the family: one wrapper, not one per load
        with speed.instance_only():
            modeling_llama.LlamaRMSNorm = type("FusedNorm", (torch.nn.Module,), {})
            modeling_llama.apply_rotary_pos_emb = cuda_only
    assert modeling_llama.LlamaRMSNorm is norm
    assert modeling_llama.apply_rotary_pos_emb.cuda is cuda_only
    # (On a GPU machine an earlier test's chat may have wrapped it already: its CPU function is kept.)
    assert modeling_llama.apply_rotary_pos_emb.elsewhere is getattr(rotary, "elsewhere", rotary)
    after = AutoModelForCausalLM.from_pretrained(tiny_model_path())(input_ids=ids).logits
    assert torch.equal(before, after)
