"""Padding-free (packed) batches compute exactly what padded batches compute.

The fast GPU path (`ipylora.engine.speed`) concatenates a batch's rows into one row and relies on
the attention function to keep every sequence to itself. These tests run that path (TRL's
padding-free collator -> `cu_seq_lens` / `position_ids` -> `varlen_attention`) on CPU, where the
kernel is SDPA under a block-diagonal causal mask (the GPU swaps in FlashAttention varlen; the
benchmark checks that kernel against padded batches on the GPU), and compare per-sequence logits
and the loss with ordinary padded batches.
"""

import pytest
import torch

from ipylora.engine import speed
from ipylora.engine.data import tokenize_pairs

PAIRS = [
    ("###Human:\ngenerate a prompt for Machine Learning\n\n### Assistant:\n", "abstract machine brain, digital art"),
    ("###Human:\nhi\n\n### Assistant:\n", "hello"),
    ("###Human:\ngenerate a stable diffusion prompt for Neural Networks, long and detailed\n\n### Assistant:\n",
     "glowing network of interconnected nodes, deep blue and neon cyan palette, volumetric light, 8k"),
    ("###Human:\nwhy\n\n### Assistant:\n", "because the loss says so"),
]


def _tiny_llama():
    from transformers import AutoModelForCausalLM

    from ipylora.engine.tiny import tiny_model_path

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_path()), dtype=torch.float32)


def _tiny_qwen2_gqa():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    return Qwen2ForCausalLM(config)


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                        init_lora_weights=False)  # random B: the adapter changes the output
    return get_peft_model(model, config).eval()


def _batches(tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = tokenize_pairs(PAIRS, tokenizer, max_length=64)
    examples = [{"input_ids": i, "labels": lab} for i, lab in zip(rows["input_ids"], rows["labels"])]
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(examples)
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(examples)
    return [len(i) for i in rows["input_ids"]], padded, packed


def _packed_logits(model, packed, lengths):
    out = model(**packed)
    pieces = torch.split(out.logits[0], lengths)
    return out, pieces


@pytest.fixture(scope="module")
def tokenizer():
    from ipylora.engine.models import load_tokenizer
    from ipylora.engine.tiny import tiny_model_path

    return load_tokenizer(str(tiny_model_path()))


@pytest.mark.parametrize("build", [_tiny_llama, _tiny_qwen2_gqa], ids=["llama", "qwen2-gqa"])
def test_packed_forward_matches_padded(build, tokenizer):
    model = _lora(build())
    lengths, padded, packed = _batches(tokenizer)
    assert len(set(lengths)) > 1 and packed["input_ids"].shape == (1, sum(lengths))

    speed.set_attention(model.get_base_model(), "sdpa")
    with torch.no_grad():
        reference = model(**padded)
        speed.set_attention(model.get_base_model(), "varlen")
        out, pieces = _packed_logits(model, packed, lengths)
        # Boundaries derived from position_ids alone (no cu_seq_lens from the collator) give the same.
        only_positions = {k: packed[k] for k in ("input_ids", "labels", "position_ids")}
        out_positions, _ = _packed_logits(model, only_positions, lengths)

    for i, n in enumerate(lengths):
        diff = (pieces[i] - reference.logits[i, :n]).abs().max().item()
        assert diff < 1e-4, f"sequence {i}: packed logits differ from padded by {diff}"
    assert abs(out.loss.item() - reference.loss.item()) < 1e-5
    assert torch.allclose(out_positions.logits, out.logits, atol=1e-5)


def test_packing_without_boundaries_would_differ(tokenizer):
    """The check above can fail: attention across sequence boundaries changes later sequences."""
    model = _lora(_tiny_llama())
    lengths, padded, packed = _batches(tokenizer)
    speed.set_attention(model.get_base_model(), "sdpa")
    with torch.no_grad():
        reference = model(**padded)
        leaky = model(input_ids=packed["input_ids"], labels=packed["labels"])  # one long causal row
    second = torch.split(leaky.logits[0], lengths)[1]
    assert (second - reference.logits[1, : lengths[1]]).abs().max().item() > 1e-3


def test_rows_for_tokens_keeps_batches_under_budget():
    import random

    rng = random.Random(0)
    lengths = [min(1024, max(16, int(rng.lognormvariate(5.4, 0.7)))) for _ in range(5000)]
    rows = speed.rows_for_tokens(lengths, 16384)
    assert 20 < rows < 80
    worst = max(sum(rng.sample(lengths, rows)) for _ in range(2000))
    assert worst <= 16384 * 1.05  # a soft budget: the memory plan keeps a margin for this


def test_fast_settings_is_a_no_op_on_cpu(tokenizer):
    model = _lora(_tiny_llama())
    before = model.get_base_model().config._attn_implementation
    assert speed.fast_settings(model, tokenizer, [10, 20], precision=None, device="cpu") == {}
    assert model.get_base_model().config._attn_implementation == before


def test_packed_fused_forward_matches_padded_dpo_batch():
    """DPO's padded chosen/rejected batch (and GRPO's left + right padded rows) through
    `packed.pack_padded_forward`: the same per-token log-probs, entropies and LoRA gradients as the
    padded forward, prompts masked."""
    from trl.trainer.utils import add_fused_lm_head

    from ipylora.engine.packed import pack_padded_forward

    model = _lora(_tiny_qwen2_gqa())
    speed.set_attention(model.get_base_model(), "varlen")
    base = model.get_base_model()
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    g = torch.Generator().manual_seed(1)
    lengths, prompts = [9, 14, 4, 12, 17, 6], [3, 5, 0, 4, 5, 1]  # a row with no prompt: its first token is a label
    width = max(lengths)
    ids = torch.randint(1, 1024, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    mask[3] = mask[3].roll(2)  # GRPO's layout: left padding before the prompt, right padding after the completion
    mask[5] = mask[5].flip(0)  # only left padding
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100)
    for row, p in enumerate(prompts):
        first = int(mask[row].argmax())
        labels[row, :first + p] = -100

    def run():
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
        out.log_probs.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return out, grads

    padded, padded_grads = run()
    fused = base.forward
    pack_padded_forward(base)
    assert base.forward is not fused
    packed, packed_grads = run()
    assert packed.log_probs.shape == padded.log_probs.shape == (len(lengths), width - 1)
    torch.testing.assert_close(packed.log_probs, padded.log_probs, atol=1e-5, rtol=1e-4)
    valid = labels[:, 1:] != -100
    torch.testing.assert_close(packed.entropy[valid], padded.entropy[valid], atol=1e-5, rtol=1e-4)
    assert torch.equal(packed.is_top1[valid], padded.is_top1[valid])
    assert not packed.log_probs[~valid].any()
    for a, b in zip(packed_grads, padded_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_warm_kernels_runs_both_row_forms_and_leaves_no_trace():
    """speed.warm_kernels: a forward and backward of a packed row of 32 tokens and one of 33 (the two
    forms Triton compiles for a row length), leaving the random state, the gradients and the mode as
    they were."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_tiny_qwen2_gqa(), LoraConfig(r=8, lora_dropout=0.1, target_modules="all-linear",
                                                          init_lora_weights=False)).eval()
    speed.set_attention(model.get_base_model(), "varlen")
    rows, grads = [], []
    model.get_base_model().model.embed_tokens.register_forward_hook(lambda m, a, out: rows.append(out.shape[1]))
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    lora_a.register_hook(lambda g: grads.append(g.abs().sum().item()))
    state = torch.random.get_rng_state()
    speed.warm_kernels(model)
    assert rows == [32, 33] and len(grads) == 2 and all(g > 0 for g in grads)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not model.training and all(p.grad is None for p in model.parameters())
