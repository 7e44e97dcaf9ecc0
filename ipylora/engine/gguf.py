"""A merged model as one GGUF file (llama.cpp, Ollama, LM Studio), and the Ollama Modelfile beside it.

The file is written with the `gguf` package (llama.cpp's own gguf-py): its writer, its tensor-name
tables, its vocabulary helpers and its quantizers, never a hand-written layout. llama.cpp's
converter (convert_hf_to_gguf.py) is not a package on PyPI (gguf ships only the library), so the
little it adds on top of those tables is repeated here for the families we support, and checked
by loading the file back: Llama-layout attention (Llama, Mistral) has its q/k rows permuted from
Hugging Face's rotary layout (first half / second half of each head) to GGML's interleaved pairs,
Qwen2/Qwen3 use GGML's NeoX rope and are written as they are.

The prompt layout travels with the weights, so a runtime prompts the model as training did:
- `tokenizer.chat_template` is the training template as a Jinja chat template (a format-string
  template is written as one; a Jinja template, chatml or the model's own, is its source);
- `tokenizer.ggml.eos_token_id` is the EOS training appended after every answer;
- the Modelfile's TEMPLATE is the same layout in Ollama's Go-template form (System / Prompt /
  Response: Ollama renders it once per turn, which is how training laid out turns), its SYSTEM the
  system prompt the training rows shared, its `PARAMETER stop` lines the end-of-turn text and EOS.

Quantization: f16, bf16 and gguf's own q8_0 / q4_0. K-quants (q4_k_m...) need llama.cpp's
quantizer: with llama-cpp-python installed it quantizes the f16 file, otherwise they are refused
with the llama-quantize command to run instead.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ipylora.engine.errors import ConfigError

# HF architecture -> gguf MODEL_ARCH name. Mistral is written as llama, as llama.cpp does (its
# sliding window is not in the format: answers match within the window, 4096 tokens for 7B v0.1).
ARCHITECTURES = {"LlamaForCausalLM": "LLAMA", "MistralForCausalLM": "LLAMA",
                 "Qwen2ForCausalLM": "QWEN2", "Qwen3ForCausalLM": "QWEN3"}
SUPPORTED_NAMES = "Llama (1-3), Mistral, Qwen2/Qwen2.5, Qwen3"
QUANTS = ("f16", "bf16", "q8_0", "q4_0")
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
# The byte-level pre-tokenizer alone is GPT-2's regex; others are matched by their split regex.
# llama.cpp's name for it is "gpt-2" ("gpt2" is the tokenizer model's name: a file stating it as the
# pre-tokenizer fails to load there, "unknown pre-tokenizer type"; transformers reads either).
GPT2_PRE = "gpt-2"


class GGUFExportError(ConfigError):
    """The model, its tokenizer or the options cannot be written as GGUF."""


@dataclass(frozen=True)
class GGUFFiles:
    """What `write_gguf` wrote."""

    gguf: Path
    """The .gguf file (weights, tokenizer, chat template)."""
    modelfile: Path
    """The Ollama Modelfile beside it."""
    quant: str
    """The weights' type (f16, bf16, q8_0, q4_0, or a k-quant)."""
    notes: tuple[str, ...] = ()
    """What the user should know (e.g. multi-turn layout approximations)."""


# -- checks, before anything is merged ------------------------------------------------------------
def check_quant(quant: str) -> str:
    """The quant name, lower-cased; unknown ones and unavailable k-quants are refused in one line."""
    quant = (quant or "f16").lower()
    if quant in QUANTS:
        return quant
    if quant in K_QUANTS:
        if _llama_cpp() is not None:
            return quant
        raise GGUFExportError(
            f"--quant {quant}: k-quants need llama.cpp's quantizer (pip install llama-cpp-python, or llama.cpp's "
            f"llama-quantize). Available here: {', '.join(QUANTS)}. Write --quant f16, then run "
            f"`llama-quantize MODEL-f16.gguf MODEL-{quant}.gguf {quant.upper()}`.")
    raise GGUFExportError(f"--quant {quant!r} is not one of {', '.join(QUANTS)} "
                          f"(k-quants such as q4_k_m: with llama.cpp's llama-quantize on the f16 file).")


def check_architecture(config) -> str:
    """The gguf MODEL_ARCH name for a transformers config; other architectures are refused in one line."""
    found = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    if found not in ARCHITECTURES:
        raise GGUFExportError(f"--gguf writes {SUPPORTED_NAMES} models; this one is {found}: save it with "
                              "--merge and convert it with llama.cpp's convert_hf_to_gguf.py, if llama.cpp knows it.")
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
        raise GGUFExportError(f"--gguf: rope scaling {rope.get('rope_type')!r} is not written here (default, linear "
                              "and llama3 are): save with --merge and convert with llama.cpp's convert_hf_to_gguf.py.")
    return ARCHITECTURES[found]


def _rope(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def _llama_cpp():
    try:
        import llama_cpp
    except Exception:  # not installed, or its shared library does not load
        return None
    return llama_cpp


# -- the file ------------------------------------------------------------------------------------
def write_gguf(model, tokenizer, path: Path, quant: str, template, system: str | None, name: str) -> GGUFFiles:
    """Write `model` (merged, plain transformers) with `tokenizer` as one GGUF file at `path`, and the
    Modelfile beside it; `template` / `system`: the run's training template and system prompt."""
    import gguf

    quant = check_quant(quant)
    arch_name = check_architecture(model.config)
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = Layout.of(template, tokenizer)
    if system and not layout.system_ok:
        raise GGUFExportError(f"The {template.name} template has no place for a system prompt, yet the run trained "
                              "with one: train with --template chatml to export it.")
    direct = quant if quant in QUANTS else "f16"  # a k-quant starts from the f16 file
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".gguf", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        _write_hparams(writer, model.config, arch_name, direct, name)
        _write_vocab(writer, tokenizer, model.config.vocab_size, chat_template(template, tokenizer))
        _write_tensors(writer, model, arch, arch_name, direct)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if quant not in QUANTS:
            _k_quantize(tmp, quant)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    modelfile = write_modelfile(path.parent / "Modelfile", path.name, layout, system, tokenizer.eos_token)
    return GGUFFiles(path, modelfile, quant, layout.notes)


def _write_hparams(writer, config, arch_name: str, quant: str, name: str) -> None:
    import gguf

    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    writer.add_name(name)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if arch_name == "LLAMA":
        writer.add_rope_dimension_count(head_dim)
    if getattr(config, "head_dim", None):  # as llama.cpp's converter: Qwen3's loaders default it to 128 otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _rope_freqs(config) -> list[float]:
    """Llama 3.1's per-frequency rope factors, as llama.cpp's converter computes them (rope_freqs)."""
    rope = _rope(config)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base, factor = float(rope["rope_theta"]), float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for k in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (k / dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def _permute(weights, heads: int):
    """HF rotary rows (per head: first halves, then second halves) -> GGML's interleaved pairs,
    as llama.cpp's LlamaModel.permute does; transformers' GGUF loader applies the inverse."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _write_tensors(writer, model, arch, arch_name: str, quant: str) -> None:
    import gguf
    import numpy as np
    import torch

    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"--gguf: the tensor {hf_name} has no GGUF name for {arch_name.lower()}: this "
                                  "checkpoint has parts the format does not define; save it with --merge instead.")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if arch_name == "LLAMA" and ".attn_q." in name:
            data = _permute(data, heads)
        elif arch_name == "LLAMA" and ".attn_k." in name:
            data = _permute(data, kv_heads)
        _add_tensor(writer, name, data, _tensor_type(name, data, quant))
    if arch_name == "LLAMA" and _rope(config)["rope_type"] == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                          np.asarray(_rope_freqs(config), dtype=np.float32))


def _tensor_type(name: str, data, quant: str):
    """1-D tensors (norms, biases) stay float32, as in llama.cpp's files; matrices get the quant, except
    that q4_0 keeps the embeddings and the output layer at q8_0 (llama-quantize keeps them higher too),
    and a row that is not a whole number of blocks falls back to f16."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if data.ndim < 2:
        return Q.F32
    wanted = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quant]
    if wanted == Q.Q4_0 and name.split(".")[0] in ("token_embd", "output"):
        wanted = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if data.shape[-1] % block == 0 else Q.F16


def _add_tensor(writer, name: str, data, qtype) -> None:
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    elif qtype == Q.F16:
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)


def _k_quantize(path: str, quant: str) -> None:
    """Re-quantize the f16 file at `path` in place with llama.cpp (llama-cpp-python's binding)."""
    import ctypes

    llama_cpp = _llama_cpp()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}", None)
    if ftype is None:
        raise GGUFExportError(f"--quant {quant}: this llama-cpp-python has no {quant.upper()}: run llama.cpp's "
                              "llama-quantize on an f16 file.")
    out = path + f".{quant}"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    try:
        failed = llama_cpp.llama_model_quantize(path.encode(), out.encode(), ctypes.byref(params))
        if failed:
            raise GGUFExportError(f"--quant {quant}: llama.cpp's quantizer failed (code {failed}): write --quant f16 "
                                  "and run llama-quantize on it.")
        os.replace(out, path)
    finally:
        if os.path.exists(out):
            os.remove(out)


# -- the tokenizer -------------------------------------------------------------------------------
def _write_vocab(writer, tokenizer, vocab_size: int, template_text: str) -> None:
    """Tokens, types, merges and special ids with gguf's vocab helpers (BPE as llama.cpp's converter
    lists it; SentencePiece-style vocabularies through gguf.LlamaHfVocab / SentencePieceVocab)."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="ipylora-gguf-vocab-") as folder:
        tokenizer.save_pretrained(folder)
        spec = _tokenizer_json(folder)
        model = spec.get("model", {}) if spec else {}
        if model.get("type") == "BPE" and not model.get("byte_fallback") and spec["decoder"]["type"] == "ByteLevel":
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(_bpe_pre(spec))
            tokens, types = _bpe_tokens(tokenizer, vocab_size)
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            merges = True
        else:
            vocab = _spm_vocab(Path(folder))
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            tokens, scores, types = [], [], []
            for text, score, kind in vocab.all_tokens():
                tokens.append(text), scores.append(score), types.append(kind)
            while len(tokens) < vocab_size:
                tokens.append(f"[PAD{len(tokens)}]".encode()), scores.append(-1000.0)
                types.append(gguf.TokenType.UNUSED)
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            merges = False
        special = gguf.SpecialVocab(folder, load_merges=merges, n_vocab=len(tokens))
    # The ids and flags training used, not whatever the files default to.
    special.special_token_ids = {k: v for k, v in special.special_token_ids.items() if k not in ("bos", "eos", "pad")}
    for kind in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            special.special_token_ids[kind] = int(token_id)
    empty = tokenizer("")["input_ids"]
    special.add_special_token = {"bos": tokenizer.bos_token_id is not None and tokenizer.bos_token_id in empty,
                                 "eos": tokenizer.eos_token_id is not None and tokenizer.eos_token_id in empty}
    special.chat_template = template_text
    special.add_to_gguf(writer, quiet=True)


def _tokenizer_json(folder: str) -> dict | None:
    path = Path(folder) / "tokenizer.json"
    return json.loads(path.read_text("utf-8")) if path.exists() else None


def _bpe_pre(spec: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (tokenizer.ggml.pre), read from its regex."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return GPT2_PRE
    splits = [p for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
    if pre.get("type") == "Sequence" and len(splits) == 1:
        regex = splits[0].get("pattern", {}).get("Regex")
        for known, name in _known_splits().items():
            if regex == known:
                return name
    raise GGUFExportError("--gguf: this tokenizer's pre-tokenizer is not one llama.cpp knows by name (gpt-2, llama3, "
                          "qwen2, ...): save with --merge and convert with llama.cpp's convert_hf_to_gguf.py.")


def _known_splits() -> dict[str, str]:
    """regex -> llama.cpp pre-tokenizer name, from transformers' GGUF table (the reverse direction)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return {}
    found: dict[str, str] = {}
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        found.setdefault(regex, name)
    return found


def _bpe_tokens(tokenizer, vocab_size: int):
    """Tokens and types in id order, as llama.cpp's converter lists a byte-level BPE vocabulary:
    special added tokens are CONTROL, other added tokens USER_DEFINED, holes [PADn] UNUSED."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    size = max(vocab_size, max(reverse) + 1)
    tokens, types = [], []
    for i in range(size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]"), types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i]), types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _spm_vocab(folder: Path):
    import gguf

    for kind in (gguf.LlamaHfVocab, gguf.SentencePieceVocab):
        try:
            return kind(folder)
        except (FileNotFoundError, TypeError, ImportError):
            continue
    raise GGUFExportError("--gguf writes byte-level BPE (GPT-2, Llama 3, Qwen) and SentencePiece (Llama 2, Mistral) "
                          "tokenizers; this one is neither: save with --merge and convert it with llama.cpp.")


# -- the prompt layout ---------------------------------------------------------------------------
_USER, _SYSTEM, _ANSWER = "\ue000user\ue001", "\ue000system\ue001", "\ue000answer\ue001"


@dataclass(frozen=True)
class Layout:
    """One turn of the training template in pieces: [system_pre SYSTEM system_to_user | user_pre] USER
    user_post ANSWER answer_end, answer_end holding the end-of-turn text, EOS (where training appended
    it) and the whitespace before the next turn."""

    user_pre: str
    user_post: str
    answer_end: str
    end_of_turn: str
    """The trained text after the answer (e.g. <|im_end|>), without EOS."""
    system_ok: bool
    system_pre: str = ""
    system_to_user: str = ""
    notes: tuple[str, ...] = ()

    @classmethod
    def of(cls, template, tokenizer) -> Layout:
        from ipylora.engine.errors import DatasetError

        eos = tokenizer.eos_token or ""
        plain = _text(template.prompt_segments([{"role": "user", "content": _USER}]))
        if plain.count(_USER) != 1:
            raise GGUFExportError(f"The {template.name} template does not place the user's text once per turn: "
                                  "train with --template chatml to export it as GGUF.")
        user_pre, user_post = plain.split(_USER)
        system_ok, system_pre, system_to_user = False, "", ""
        try:
            with_system = _text(template.prompt_segments([{"role": "system", "content": _SYSTEM},
                                                          {"role": "user", "content": _USER}]))
        except (DatasetError, ConfigError):  # the template refuses system turns
            with_system = ""
        if with_system.count(_SYSTEM) == 1 and with_system.endswith(_USER + user_post):
            head, rest = with_system.split(_SYSTEM)
            system_ok, system_pre, system_to_user = True, head, rest[: -len(_USER + user_post)]
        one = template.segments([{"role": "user", "content": _USER}, {"role": "assistant", "content": _ANSWER}])
        trained = one[-1][0]
        if not trained.startswith(_ANSWER):
            raise GGUFExportError(f"The {template.name} template rewrites the answer: train with --template chatml "
                                  "to export it as GGUF.")
        end_of_turn = trained[len(_ANSWER):]
        closed = end_of_turn if eos and end_of_turn.endswith(eos) else end_of_turn + eos
        two = template.segments([{"role": "user", "content": _USER}, {"role": "assistant", "content": _ANSWER},
                                 {"role": "user", "content": _USER}, {"role": "assistant", "content": _ANSWER}])
        second = two[2][0] if len(two) == 4 else ""
        notes: tuple[str, ...] = ()
        if second.endswith(user_pre + _USER + user_post):
            tail = second[: -len(user_pre + _USER + user_post)]
        else:
            tail = ""
            notes = (f"The {template.name} template lays out a later turn unlike the first: Ollama's history turns "
                     "differ slightly from training (single-turn prompts are exact).",)
        eot = end_of_turn[: -len(eos)] if eos and end_of_turn.endswith(eos) else end_of_turn
        return cls(user_pre, user_post, closed + tail, eot.strip(), system_ok, system_pre, system_to_user, notes)


def _text(segments) -> str:
    return "".join(text for text, _ in segments)


def chat_template(template, tokenizer) -> str:
    """The training template as a Jinja chat template: a Jinja template as written (`model`: the
    tokenizer's own), a format-string template translated (system and user turns share the prompt
    slot, joined by a blank line, and each answer ends with its suffix and EOS, as training wrote them)."""
    from ipylora.engine.templates import _HEADER, FormatTemplate

    if not isinstance(template, FormatTemplate):
        source = template.source
        if _HEADER.match(source):  # `model`, as recorded: drop ipylora's header and token sets
            source = _HEADER.sub("", source, count=1)
            source = re.sub(r'^(\{%- set (bos|eos)_token = "(?:[^"\\]|\\.)*" -%\})+', "", source)
        return source
    before, after = template.prefix.split("{prompt}")
    eos, suffix = tokenizer.eos_token or "", template._trained_suffix
    add_eos = "" if eos and suffix.endswith(eos) else "{{- eos_token -}}"
    prompt = f"ns.tail ~ {_jinja(before)} ~ (ns.users | join({_jinja(chr(10) * 2)})) ~ {_jinja(after)}"
    return ("{%- set ns = namespace(users=[], tail='') -%}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'assistant' -%}"
            f"{{{{- {prompt} ~ message['content'] ~ {_jinja(suffix)} -}}}}{add_eos}"
            f"{{%- set ns.users = [] -%}}{{%- set ns.tail = {_jinja(template._tail)} -%}}"
            "{%- else -%}{%- set ns.users = ns.users + [message['content']] -%}{%- endif -%}"
            "{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{- {prompt} -}}}}{{%- endif -%}}")


def _jinja(text: str) -> str:
    """A Jinja string literal."""
    return json.dumps(text, ensure_ascii=False)


# -- Ollama ----------------------------------------------------------------------------------------
def ollama_template(layout: Layout) -> str:
    """The layout as an Ollama TEMPLATE (Go template over .System, .Prompt, .Response).

    Without `.Messages`, Ollama renders the template once per turn (the Modelfile's SYSTEM, or the
    request's, in the first turn only) and cuts the last one at `.Response`: exactly the text
    training wrote before each answer, and after it the end-of-turn text and EOS.
    """
    user = _go(layout.user_pre)
    if layout.system_ok:
        user = (f"{{{{ if .System }}}}{_go(layout.system_pre)}{{{{ .System }}}}{_go(layout.system_to_user)}"
                f"{{{{ else }}}}{user}{{{{ end }}}}")
    return f"{user}{{{{ .Prompt }}}}{_go(layout.user_post)}{{{{ .Response }}}}{_go(layout.answer_end)}"


def _go(text: str) -> str:
    """Literal text for a Go template: as is, unless it holds `{{`, then a quoted string action."""
    return f"{{{{ {json.dumps(text, ensure_ascii=False)} }}}}" if "{{" in text else text


def modelfile_text(gguf_name: str, layout: Layout, system: str | None, eos: str | None) -> str:
    template = ollama_template(layout)
    lines = ["# Written by ipylora. In this folder: ollama create NAME -f Modelfile", f"FROM ./{gguf_name}",
             f"TEMPLATE {_quoted(template, 'TEMPLATE', block=True)}"]
    if system:
        lines.append(f"SYSTEM {_quoted(system, 'SYSTEM', block=True)}")
    for stop in dict.fromkeys(s for s in (layout.end_of_turn, eos) if s):
        lines.append(f"PARAMETER stop {_quoted(stop, 'stop')}")
    lines += [f"# {note}" for note in layout.notes]
    return "\n".join(lines) + "\n"


def _quoted(text: str, what: str, block: bool = False) -> str:
    """A Modelfile value: triple quotes (taken as written, newlines included) unless a plain quote will do."""
    if '"""' in text or text.endswith('"'):
        raise GGUFExportError(f'The {what} text holds """ or ends with ", which a Modelfile cannot quote: change it.')
    return f'"""{text}"""' if (block or '"' in text or "\n" in text or "\\" in text) else f'"{text}"'


def write_modelfile(path: Path, gguf_name: str, layout: Layout, system: str | None, eos: str | None) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".Modelfile.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(modelfile_text(gguf_name, layout, system, eos))
    os.replace(tmp, path)
    return path
