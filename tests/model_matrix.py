"""Tiny random-init checkpoints of the model families users bring, for the end-to-end matrix.

Each family is its real transformers architecture class with the real module names and its
distinctive features switched on (sliding window, soft-capping, q/k norms, fused projections,
MoE experts, tied embeddings), at a shape that trains in seconds on a CPU: hidden 64, 2 layers.
The tokenizer is the embedded model's vocabulary with a chat template written here in the
family's layout and its end-of-turn token (added as a special token where the vocabulary lacks
it), so `--template model` trains on exactly what the family's chat models emit.

`build(family, root)` writes one checkpoint (save_pretrained: config, safetensors weights,
generation config with eos = [EOS, end-of-turn], tokenizer) and returns its folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

DOCS_TABLE = Path(__file__).resolve().parents[1] / "docs" / "models.json"

HIDDEN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
# As for the embedded model (tiny.py): with the usual 0.02 init LoRA barely moves a random
# 2-layer model's output; 0.1 lets it memorise a dozen pairs in a few dozen steps.
INIT = dict(initializer_range=0.1)

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
          "{{ m.content }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}"
         "{{ raise_exception('System role not supported') }}{% endif %}"
         "<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n{{ m.content }}<end_of_turn>\n"
         "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
           "{% elif m.role == 'assistant' %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}")
PHI3 = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
OLMO2 = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}"
         "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# gpt-oss's "harmony" layout, final channel only: a turn is <|start|>role<|message|>...<|end|>, the
# assistant's answer goes to the final channel and the last one closes with <|return|> (its real
# template does the same; what it adds, a system prompt and the analysis channel, is left out).
HARMONY = ("{% for m in messages %}<|start|>{{ m.role }}{% if m.role == 'assistant' %}<|channel|>final{% endif %}"
           "<|message|>{{ m.content }}{{ '<|return|>' if m.role == 'assistant' and loop.last else '<|end|>' }}"
           "{% endfor %}{% if add_generation_prompt %}<|start|>assistant<|channel|>final<|message|>{% endif %}")
PLAIN = ("{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n"
         "{% elif m.role == 'assistant' %}Assistant: {{ m.content }}{{ eos_token }}\n{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}Assistant:{% endif %}")


@dataclass(frozen=True)
class Family:
    """One architecture of the matrix."""

    name: str
    config: str
    """The transformers config class."""
    settings: dict
    """Shape and the family's features, on top of the token ids set from the tokenizer."""
    template: str
    """The chat template (Jinja), in the family's layout."""
    end_of_turn: str | None = None
    """The token that ends an assistant turn, if not EOS itself; added if the vocabulary lacks it."""
    specials: tuple[str, ...] = ()
    """Other template markers made single special tokens, as the family's tokenizer has them."""
    slow: bool = False
    """Known to take longest (MoE routing): the report's timings name it."""
    notes: str = ""
    features: tuple[str, ...] = field(default=())


FAMILIES = [
    Family("llama3", "LlamaConfig", {**HIDDEN, **INIT, "tie_word_embeddings": True}, LLAMA3, "<|eot_id|>",
           ("<|start_header_id|>", "<|end_header_id|>"), features=("tied embeddings",)),
    Family("qwen2-5", "Qwen2Config", {**HIDDEN, **INIT, "tie_word_embeddings": True}, CHATML, "<|im_end|>",
           ("<|im_start|>",), features=("qkv bias", "tied embeddings")),
    Family("qwen3", "Qwen3Config", {**HIDDEN, **INIT, "head_dim": 16, "tie_word_embeddings": True}, CHATML,
           "<|im_end|>", ("<|im_start|>",), features=("q/k norm",)),
    Family("qwen3-moe", "Qwen3MoeConfig", {**HIDDEN, **INIT, "head_dim": 16, "num_experts": 4,
                                          "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                          "decoder_sparse_step": 1, "norm_topk_prob": True},
           CHATML, "<|im_end|>", ("<|im_start|>",), slow=True, features=("q/k norm", "MoE experts")),
    Family("mistral", "MistralConfig", {**HIDDEN, **INIT, "sliding_window": 16}, MISTRAL,
           specials=("[INST]", "[/INST]"), features=("sliding window",)),
    Family("mixtral", "MixtralConfig", {**HIDDEN, **INIT, "sliding_window": 16, "num_local_experts": 4,
                                        "num_experts_per_tok": 2}, MISTRAL,
           specials=("[INST]", "[/INST]"), slow=True, features=("sliding window", "MoE experts")),
    Family("gemma2", "Gemma2Config", {**HIDDEN, **INIT, "head_dim": 16, "sliding_window": 16,
                                      "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                                      "query_pre_attn_scalar": 16, "tie_word_embeddings": True},
           GEMMA, "<end_of_turn>", ("<start_of_turn>",), features=("soft-capping", "sliding window", "tied")),
    Family("gemma3", "Gemma3TextConfig", {**HIDDEN, **INIT, "head_dim": 16, "sliding_window": 16,
                                          "layer_types": ["sliding_attention", "full_attention"],
                                          "query_pre_attn_scalar": 16, "tie_word_embeddings": True},
           GEMMA, "<end_of_turn>", ("<start_of_turn>",), features=("hybrid sliding/full cache", "q/k norm")),
    Family("phi3", "Phi3Config", {**HIDDEN, **INIT, "sliding_window": None}, PHI3, "<|end|>",
           ("<|user|>", "<|assistant|>", "<|system|>"), features=("fused qkv_proj / gate_up_proj",)),
    Family("smollm3", "SmolLM3Config", {**HIDDEN, **INIT, "no_rope_layers": [1, 0], "tie_word_embeddings": True},
           CHATML, "<|im_end|>", ("<|im_start|>",), features=("NoPE layers", "tied embeddings")),
    Family("olmo2", "Olmo2Config", {**HIDDEN, **INIT}, OLMO2, specials=("<|user|>", "<|assistant|>"),
           features=("q/k norm", "post-norm")),
    # Its experts are fused 3-D parameters with biases, its router has a bias, every attention layer
    # has a learned sink per head; intermediate 64 as the MoE families' expert width.
    Family("gpt-oss", "GptOssConfig", {**HIDDEN, **INIT, "intermediate_size": 64, "head_dim": 16,
                                       "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 16,
                                       "layer_types": ["sliding_attention", "full_attention"],
                                       # YaRN at its real ratio (131072 / 4096), scaled to this context
                                       "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                           "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0,
                                                           "original_max_position_embeddings": 16}},
           HARMONY, "<|return|>", ("<|start|>", "<|message|>", "<|end|>", "<|channel|>"), slow=True,
           features=("attention sinks", "hybrid sliding/full", "MoE experts", "expert biases")),
    # GPT-2 and OPT configs default to dropout 0.1 inside the model, which at this size and step count
    # keeps both the engine and plain peft + trl from memorising anything (0/12): off, as for the others.
    Family("gpt2", "GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, **INIT), PLAIN,
           features=("Conv1D", "tied embeddings")),
    Family("gpt-neox", "GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.25,
                                             tie_word_embeddings=False, **INIT), PLAIN,
           features=("fused query_key_value", "parallel residual")),
    Family("opt", "OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                    word_embed_proj_dim=64, max_position_embeddings=512, init_std=0.1,
                                    dropout=0.0), PLAIN,
           features=("learned positions", "tied embeddings")),
    Family("falcon", "FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          multi_query=True, parallel_attn=True, bias=False, **INIT), PLAIN,
           features=("multi-query attention", "fused query_key_value")),
]
BY_NAME = {f.name: f for f in FAMILIES}
# transformers swaps only plain nn.Linear (and Conv1D) for bitsandbytes layers: Falcon's are FalconLinear.
NOT_QUANTIZED = {"falcon"}

# -- the coverage table ------------------------------------------------------------------------
# family -> column -> [status, detail]; status is what docs/models.json must agree with ("yes",
# "fallback", "refused", "untested"), the detail (figures) is shown but not compared.
REPORT: dict[str, dict[str, list[str]]] = {}


def record(family: Family, column: str, status: str, detail: str = "") -> None:
    REPORT.setdefault(family.name, {})[column] = [status, detail]


def write_report(report: dict) -> Path:
    """Write what the tests saw where scripts/models_table.py --cpu reads it; returns the path."""
    path = Path(os.environ.get("IPYLORA_MATRIX_REPORT") or Path(tempfile.gettempdir()) / "ipylora-model-matrix.json")
    previous = json.loads(path.read_text()) if path.exists() else {}
    for name, cells in report.items():  # a partial run (-k) adds to what an earlier one wrote
        previous.setdefault(name, {}).update(cells)
    path.write_text(json.dumps(previous, indent=1, sort_keys=True) + "\n")
    return path


def disagreements(report: dict, table: Path = DOCS_TABLE) -> list[str]:
    """Cells the committed table lacks, or where it claims "yes" and the tests saw something else.
    (A table that says less than the tests saw, e.g. "untested" where a pair was memorised this
    time, is stale but claims nothing false: regenerating it is enough, failing the run is not.)"""
    cpu = json.loads(table.read_text())["cpu"] if table.exists() else {}
    stale = []
    for name, cells in sorted(report.items()):
        for column, (status, _) in sorted(cells.items()):
            committed = cpu.get(name, {}).get(column, [None])[0]
            if committed is None or (committed == "yes" and status != "yes"):
                stale.append(f"{name} {column}: tests saw {status!r}, the table says {committed!r}")
    return stale


def available(family: Family) -> bool:
    """Whether this transformers version has the family's config class."""
    import transformers

    return hasattr(transformers, family.config)


def build(family: Family, root: Path) -> Path:
    """Write the family's tiny checkpoint and tokenizer under `root`; returns the folder."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ipylora.engine.tiny import tiny_model_path

    path = Path(root) / family.name
    if (path / "model.safetensors").exists():
        return path
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    markers = [t for t in (*family.specials, family.end_of_turn) if t]
    if markers:
        tokenizer.add_special_tokens({"additional_special_tokens": markers})
    tokenizer.chat_template = family.template
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = getattr(transformers, family.config)(vocab_size=len(tokenizer), **ids, **family.settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    eos = [tokenizer.eos_token_id]
    if family.end_of_turn:
        eos.append(tokenizer.convert_tokens_to_ids(family.end_of_turn))
    model.generation_config = GenerationConfig(**ids | {"eos_token_id": eos})
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def end_of_turn_id(family: Family, tokenizer) -> int:
    """The id of the token that closes the family's assistant turn (EOS where it has no own one)."""
    return tokenizer.convert_tokens_to_ids(family.end_of_turn) if family.end_of_turn else tokenizer.eos_token_id
