"""%lora_save --gguf: one GGUF file (merged weights, tokenizer, chat template, trained EOS) and an
Ollama Modelfile that prompts the model exactly as training did."""

import dataclasses
import json
import re

import pandas as pd
import pytest

from ipylora.engine import DataArgs, TrainArgs
from ipylora.engine import gguf as gguf_export
from ipylora.engine.chat import prompt_ids
from ipylora.engine.session import Session
from ipylora.engine.templates import MODEL, FormatTemplate, _compile, get_template
from support import PROMPT, assert_one_line_error, ipython_shell

import model_matrix

pytest.importorskip("gguf")

ROWS = 12
SYSTEM = "You write stable diffusion prompts.\nOne line, no preamble."


@pytest.fixture(scope="module")
def session(concepts, tmp_path_factory):
    """The tiny model trained on 12 concept pairs, ChatML, under one system prompt, until it knows them."""
    rows = concepts.head(ROWS)
    messages = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT.format(concept=c)},
                 {"role": "assistant", "content": d}] for c, d in zip(rows.concept, rows.description)]
    s = Session()
    s.add_dataset("c", pd.DataFrame({"messages": messages}), DataArgs(template="chatml"))
    s.train("c", TrainArgs(name="small", steps=60, output=str(tmp_path_factory.mktemp("runs"))))
    return s


@pytest.fixture
def shell(session, monkeypatch):
    return ipython_shell(monkeypatch, session)


@pytest.fixture(scope="module")
def exported(session, tmp_path_factory):
    """`%lora_save small DIR --gguf` at f16, q8_0 and q4_0 (the Modelfile beside them: the last one's)."""
    out = tmp_path_factory.mktemp("gguf")
    from ipylora.engine import session as session_module

    keep = session_module._session
    session_module._session = session
    try:
        shell = ipython_shell()
        files = {}
        for quant in ("q4_0", "q8_0", "f16"):
            shell.run_line_magic("lora_save", f"small {out} --gguf --quant {quant}")
            files[quant] = out / f"small-{quant}.gguf"
    finally:
        session_module._session = keep
    return out, files


def _prompts(session, concepts):
    fmt = session.prompt_format("small")
    return [prompt_ids(session.tokenizer, fmt, PROMPT.format(concept=c), system=SYSTEM) for c in concepts.concept[:ROWS]]


def _greedy(model, ids, eos, tokens=48):
    """The greedy answer token ids to each prompt, up to and including EOS."""
    import torch

    out = []
    with torch.no_grad():
        for prompt in ids:
            done = model.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False, eos_token_id=eos,
                                  pad_token_id=eos)
            out.append(done[0, len(prompt):].tolist())
    return out


@pytest.fixture(scope="module")
def merged_answers(session, concepts):
    from ipylora.engine.export import merged_model

    model = merged_model(session.adapters["small"].run_dir, session.model_source)
    return _greedy(model, _prompts(session, concepts), session.tokenizer.eos_token_id)


def _load(folder, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(folder, gguf_file=name),
            AutoTokenizer.from_pretrained(folder, gguf_file=name))


def test_f16_file_answers_as_the_merged_model(session, exported, concepts, merged_answers):
    folder, files = exported
    model, tokenizer = _load(folder, files["f16"].name)
    ids = _prompts(session, concepts)
    # The file's own tokenizer (tokens, merges, pre-tokenizer, BOS) reads the training prompt text the same.
    template = session.prompt_format("small").template
    texts = [training_text(template, [{"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": PROMPT.format(concept=c)}], session.tokenizer)
             for c in concepts.concept[:ROWS]]
    assert [tokenizer(t)["input_ids"] for t in texts] == ids
    # A trained adapter: its answers (48 tokens of them) are the start of the trained descriptions.
    learned = [session.tokenizer.decode(a, skip_special_tokens=True) for a in merged_answers]
    assert sum((d + "<|im_end|>").startswith(a) for a, d in zip(learned, concepts.description)) >= ROWS * 3 // 4
    got = _greedy(model, ids, tokenizer.eos_token_id)
    same = sum(a == b for a, b in zip(got, merged_answers))
    print(f"f16: {same}/{ROWS} answers token for token as the merged model")
    assert same == ROWS


def test_q8_0_keeps_nearly_every_answer(session, exported, concepts, merged_answers):
    import gguf

    folder, files = exported
    ids = _prompts(session, concepts)
    same = {}
    for quant in ("q8_0", "q4_0"):
        model, _ = _load(folder, files[quant].name)
        got = _greedy(model, ids, session.tokenizer.eos_token_id)
        same[quant] = sum(a == b for a, b in zip(got, merged_answers))
    print(f"same answers: q8_0 {same['q8_0']}/{ROWS}, q4_0 {same['q4_0']}/{ROWS}")
    assert same["q8_0"] >= 0.9 * ROWS
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(files["q4_0"]).tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q4_0" and kinds["token_embd.weight"] == "Q8_0"
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(files["q8_0"]).tensors}
    # ffn_down's rows (344 = the tiny model's intermediate size) are not whole 32-blocks: f16, as llama.cpp does.
    assert {k for k, v in kinds.items() if v == "F16"} == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    assert kinds["blk.0.attn_q.weight"] == kinds["output.weight"] == "Q8_0"
    assert files["q4_0"].stat().st_size < files["q8_0"].stat().st_size < files["f16"].stat().st_size


def test_llama_cpp_answers_as_the_merged_model(session, exported, concepts, merged_answers):
    """llama.cpp itself (llama-cpp-python, when installed: it builds from source, ~11 min on 2 cores, so the
    README's test command does not install it) reads the file's tokenizer as ours and answers greedily
    as the merged model: f16 every answer token for token, q8_0 at least 90%; --quant q4_k_m (llama.cpp's
    quantizer through the binding) loads and keeps at least 3 in 4."""
    llama_cpp = pytest.importorskip("llama_cpp")

    folder, files = exported
    ids = _prompts(session, concepts)
    template = session.prompt_format("small").template
    texts = [training_text(template, [{"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": PROMPT.format(concept=c)}], session.tokenizer)
             for c in concepts.concept[:ROWS]]
    eos = session.tokenizer.eos_token_id
    # A k-quant through llama.cpp's own quantizer (the tiny model's 128/344-wide rows are not whole
    # 256-blocks, so llama.cpp falls back to q5_0/q8_0 for them, as it does for any such model).
    files = {**files, "q4_k_m": session.save("small", str(folder / "k"), gguf=True, quant="q4_k_m").gguf}
    same = {}
    for quant in ("f16", "q8_0", "q4_k_m"):
        llm = llama_cpp.Llama(model_path=str(files[quant]), n_ctx=512, n_threads=2, verbose=False)
        if quant == "f16":  # the prompt text through llama.cpp's own tokenizer: the training ids
            assert [llm.tokenize(t.encode(), add_bos=True, special=True) for t in texts] == ids
        got = []
        for prompt in ids:
            answer = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
                answer.append(token)
                if token == eos or len(answer) == 48:
                    break
            got.append(answer)
        same[quant] = sum(a == b for a, b in zip(got, merged_answers))
        llm.close()
    print(f"llama.cpp: f16 {same['f16']}/{ROWS}, q8_0 {same['q8_0']}/{ROWS}, q4_k_m {same['q4_k_m']}/{ROWS} "
          "answers as the merged model")
    assert same["f16"] == ROWS and same["q8_0"] >= 0.9 * ROWS and same["q4_k_m"] >= 3 * ROWS // 4


def test_file_carries_the_chat_template_and_the_trained_eos(session, exported):
    import gguf

    folder, files = exported
    reader = gguf.GGUFReader(files["f16"])

    def field(key):
        f = reader.fields[key]
        value = f.parts[f.data[0]]
        return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else int(value[0])

    assert field("general.architecture") == "llama"
    assert field("tokenizer.ggml.eos_token_id") == session.tokenizer.eos_token_id
    assert field("tokenizer.ggml.bos_token_id") == session.tokenizer.bos_token_id
    template = field("tokenizer.chat_template")
    assert template == get_template("chatml").source
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    rendered = _compile(template, "t").render(messages=messages, add_generation_prompt=True, eos_token="<|eos|>")
    assert rendered == training_text(get_template("chatml"), messages, session.tokenizer)


def test_modelfile_reproduces_the_run(session, exported):
    folder, _ = exported
    text = (folder / "Modelfile").read_text()
    assert "FROM ./small-f16.gguf\n" in text
    assert f'SYSTEM """{SYSTEM}"""' in text
    assert re.findall(r'^PARAMETER stop "(.*)"$', text, re.M) == ["<|im_end|>", "<|eos|>"]
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S).group(1)
    messages = [{"role": "user", "content": PROMPT.format(concept="Neural Networks")}]
    expected = session.tokenizer.decode(prompt_ids(session.tokenizer, session.prompt_format("small"),
                                                   messages[0]["content"], system=SYSTEM), skip_special_tokens=False)
    assert "<|bos|>" + ollama_prompt(template, messages, SYSTEM) == expected


# -- every built-in template, rendered as Ollama renders the Modelfile ---------------------------
GO_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)


def render_go(template: str, values: dict, cut: bool = False) -> str:
    """The Go-template subset the Modelfile uses: text, {{ .Field }}, {{ "literal" }}, if/else/end on a
    field; `cut`: stop at {{ .Response }}, as Ollama does for the turn being answered."""
    out, taken = [], []
    for k, part in enumerate(GO_ACTION.split(template)):
        action = part.strip()
        if k % 2 == 0:
            out.append(part if all(taken) else "")
        elif action.startswith("if ."):
            taken.append(bool(values[action[4:]]))
        elif action == "else":
            taken[-1] = not taken[-1]
        elif action == "end":
            taken.pop()
        elif action.startswith("."):
            if cut and action == ".Response":
                break
            out.append(values[action[1:]] if all(taken) else "")
        elif action.startswith('"'):
            out.append(json.loads(action) if all(taken) else "")
        else:
            raise AssertionError(f"the Modelfile uses {action!r}, outside the subset")
    return "".join(out)


def ollama_prompt(template: str, messages: list[dict], default_system: str | None = None) -> str:
    """Ollama's prompt for a template without .Messages: consecutive turns of one role merged with a
    blank line, the system (the Modelfile's unless the request has one) in the first turn only, each
    earlier turn rendered whole, the last cut at .Response."""
    merged = []
    for m in messages:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {"role": m["role"], "content": merged[-1]["content"] + "\n\n" + m["content"]}
        else:
            merged.append(dict(m))
    if default_system and not any(m["role"] == "system" for m in merged):
        merged.insert(0, {"role": "system", "content": default_system})
    out, values = [], {"System": "", "Prompt": "", "Response": ""}
    for m in merged:
        role = {"system": "System", "user": "Prompt", "assistant": "Response"}[m["role"]]
        if (role == "System" and (values["Prompt"] or values["Response"])) or (role == "Prompt" and values["Response"]):
            out.append(render_go(template, values))
            values = {"System": "", "Prompt": "", "Response": ""}
        values[role] = m["content"]
    return "".join(out) + render_go(template, values, cut=True)


def training_text(template, messages: list[dict], tokenizer) -> str:
    """The text of the training tokens before the answer (EOS after each earlier answer, no BOS token)."""
    eos = tokenizer.eos_token
    spans = template.prompt_segments(messages)
    return "".join(t + (eos if trained and not t.endswith(eos) else "") for t, trained in spans)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Tiny checkpoints of the matrix's families (their chat templates and end-of-turn tokens). Qwen3's
    head_dim is its real 128: transformers' GGUF loader does not read attention.key_length for qwen3."""
    root = tmp_path_factory.mktemp("families")
    qwen3 = model_matrix.BY_NAME["qwen3"]
    chosen = [model_matrix.BY_NAME[name] for name in ("llama3", "mistral", "qwen2-5")]
    chosen.append(dataclasses.replace(qwen3, settings={**qwen3.settings, "head_dim": 128}))
    return {family.name: model_matrix.build(family, root) for family in chosen}


@pytest.fixture(scope="module")
def family_tokenizers(families):
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(path) for name, path in families.items()}


CONVERSATIONS = [
    [{"role": "user", "content": "one"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "uno"}, {"role": "user", "content": "two"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"},
     {"role": "assistant", "content": "uno"}, {"role": "user", "content": "two"}],
]


@pytest.mark.parametrize("spec", ["human-assistant", "alpaca", "chatml", "plain", "Q: {prompt}\nA: {response}\n\n",
                                  "model:llama3", "model:mistral", "model:qwen2-5"])
def test_every_template_renders_as_training(spec, tiny_tokenizer, family_tokenizers):
    if spec.startswith("model:"):
        tokenizer = family_tokenizers[spec.split(":")[1]]
        template = get_template(MODEL.resolve(tokenizer).source)  # as run.json records it
    else:
        tokenizer, template = tiny_tokenizer, get_template(spec)
    layout = gguf_export.Layout.of(template, tokenizer)
    assert layout.notes == ()
    text = gguf_export.modelfile_text("m.gguf", layout, None, tokenizer.eos_token)
    go = re.search(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S).group(1)
    jinja = _compile(gguf_export.chat_template(template, tokenizer), "gguf")
    for messages in CONVERSATIONS:
        if any(m["role"] == "system" for m in messages) and not layout.system_ok:
            continue
        expected = training_text(template, messages, tokenizer)
        assert ollama_prompt(go, messages) == expected, messages
        # A Jinja template is written as it is: its earlier answers lack the EOS token training put after them.
        if isinstance(template, FormatTemplate) or "assistant" not in {m["role"] for m in messages}:
            rendered = jinja.render(messages=messages, add_generation_prompt=True, bos_token=tokenizer.bos_token,
                                    eos_token=tokenizer.eos_token)
            if getattr(template, "strip_bos", False) and rendered.startswith(tokenizer.bos_token):
                rendered = rendered[len(tokenizer.bos_token):]  # llama.cpp drops it: the tokenizer adds BOS
            assert rendered == expected, messages
    assert layout.system_ok == (spec != "model:mistral")  # Mistral's [INST] layout drops system turns
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    assert stops[-1] == tokenizer.eos_token
    if spec in ("chatml", "model:qwen2-5"):
        assert stops[0] == "<|im_end|>"
    if spec == "model:llama3":
        assert stops[0] == "<|eot_id|>"


# -- architectures ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2-5", "qwen3"])
def test_architectures_load_back_with_the_same_logits(family, tmp_path, families, family_tokenizers):
    """Llama-layout q/k rows are permuted to GGML's rope layout (and back by the loader); Qwen's are not."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(families[family], dtype=torch.float32)
    tokenizer = family_tokenizers[family]
    path = tmp_path / f"{family}.gguf"
    # (Not the family's name: transformers' loader reads a llama file named *mistral* as an arch it cannot load.)
    gguf_export.write_gguf(model, tokenizer, path, "f16", get_template("plain"), None, "tiny")
    loaded, _ = _load(tmp_path, path.name)
    assert type(loaded).__name__ == (type(model).__name__ if family != "mistral" else "LlamaForCausalLM")
    ids = torch.tensor([tokenizer("a lighthouse on a cliff")["input_ids"][:14]])  # within Mistral's window (16)
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    assert (want.argmax(-1) == got.argmax(-1)).all()
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)


# -- refusals ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, concepts):
    root = tmp_path_factory.mktemp("gpt2")
    path = model_matrix.build(model_matrix.BY_NAME["gpt2"], root)
    s = Session()
    s.add_dataset("c", concepts.head(4), DataArgs(prompt=PROMPT, response="{description}"))
    s.train("c", TrainArgs(name="g", model=str(path), steps=2, output=str(root / "runs")))
    return s


def test_gguf_refuses_other_architectures_in_one_line(gpt2_run, monkeypatch, capsys, tmp_path):
    shell = ipython_shell(monkeypatch, gpt2_run)
    text = assert_one_line_error(shell, capsys, f"%lora_save g {tmp_path / 'out'} --gguf", "GPT2LMHeadModel",
                                 "Llama", "Qwen3", "--merge")
    assert not (tmp_path / "out").exists(), text


@pytest.mark.parametrize("line, needles", [
    ("%lora_save small out --gguf --quant q3", ("--quant 'q3'", "f16, bf16, q8_0, q4_0", "llama-quantize")),
    ("%lora_save small out --quant q8_0", ("--gguf",)),
    ("%lora_save small out --gguf --merge", ("--merge",)),
])
def test_gguf_mistakes_are_one_line(shell, capsys, line, needles):
    assert_one_line_error(shell, capsys, line, *needles)


def test_k_quants_without_llama_cpp_are_refused_in_one_line(shell, capsys, monkeypatch):
    monkeypatch.setattr(gguf_export, "_llama_cpp", lambda: None)
    assert_one_line_error(shell, capsys, "%lora_save small out --gguf --quant q4_k_m", "q4_k_m", "f16, bf16, q8_0, q4_0",
                          "llama-quantize", "Q4_K_M")
