"""Chat latency on a GPU: time to first token and decode tokens/s, base vs unmerged vs merged adapter.

A 7B-shaped Llama (hidden 4096, 32 layers, MLP 11008, vocab 32000) with random weights is built
directly on the GPU (no hub, no disk), in bf16 and with its linear layers quantized to 4-bit nf4
(bitsandbytes, double quant, bf16 compute: the QLoRA layout). On each it measures greedy
generation of --new-tokens tokens after a --prompt-tokens prompt, through `model.generate` as
ipylora's chat calls it (KV cache, batch 1):

    base            the model alone
    lora r16 all    ipylora's default adapter for real models (r 16 on every linear layer), unmerged
    lora r64 q,v    the seed recipe's adapter (r 64 on q_proj and v_proj), unmerged
    merged          the r16 adapter merged into the weights (merge_and_unload; for 4-bit, the nf4
                    base layout that a merged-and-requantized model has)

Time to first token is prefill + the first step; decode tokens/s is over the remaining steps.
The acceptance check: unmerged decode within 15% of merged.

    python bench/chat_latency.py                # both precisions
    python bench/chat_latency.py --precision bf16 --new-tokens 64 --repeats 2

Without CUDA it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(precision: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPE, initializer_range=0.02, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    if precision == "4bit":
        quantize_4bit(model)
    model.eval()
    model.generation_config.pad_token_id = 0
    return model


def quantize_4bit(model) -> None:
    """Swap every decoder linear layer for a bitsandbytes nf4 Linear4bit holding the same weights."""
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=torch.bfloat16, compress_statistics=True,
                                              quant_type="nf4", device="meta")
                quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                                     quant_type="nf4").to("cuda")
                setattr(parent, name, quantized)
                del child
    torch.cuda.empty_cache()


def add_adapter(model, name: str, r: int, targets: list[str]):
    from peft import LoraConfig, PeftModel, get_peft_model

    # init_lora_weights=False: B is random too, so the adapter really changes the output.
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM",
                        init_lora_weights=False)
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
    else:
        model = get_peft_model(model, config, adapter_name=name)
    model.set_adapter(name)
    model.eval()
    return model


def measure(model, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """Median time to first token (s) and decode tokens/s over `repeats` greedy generations (after a warm-up)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 30000, (1, prompt_tokens), generator=generator).cuda()
    ttft, decode = [], []
    for i in range(repeats + 1):
        clock = Clock()
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, eos_token_id=None, stopping_criteria=StoppingCriteriaList([clock]))
        assert out.shape[1] == prompt_tokens + new_tokens
        if i == 0:
            continue  # warm-up: kernels, allocator
        ttft.append(clock.times[0] - start)
        decode.append((len(clock.times) - 1) / (clock.times[-1] - clock.times[0]))
    return {"ttft_s": statistics.median(ttft), "decode_tok_s": statistics.median(decode)}


def bench(precision: str, args) -> list[dict]:
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_model(precision)
    rows = []

    def record(label, m):
        result = measure(m, args.prompt_tokens, args.new_tokens, args.repeats)
        row = {"precision": precision, "model": label, **result,
               "gpu_gib": torch.cuda.max_memory_allocated() / 2**30}
        rows.append(row)
        if args.json:  # written as it goes, so a run cut short keeps what it measured
            with open(args.json, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        print(f"{precision:>5} {label:<14} TTFT {row['ttft_s'] * 1000:7.1f} ms   decode {row['decode_tok_s']:7.1f} tok/s"
              f"   peak {row['gpu_gib']:5.1f} GiB", flush=True)

    record("base", model)
    model = add_adapter(model, "seed", 64, ["q_proj", "v_proj"])
    record("lora r64 q,v", model)
    model = add_adapter(model, "default", 16, ALL_LINEAR)
    record("lora r16 all", model)
    model.delete_adapter("seed")
    if precision == "4bit":
        # A merged 4-bit model (dequantize, add B·A, re-quantize) has exactly the base's nf4 layout and
        # kernels, so its speed is measured on the unloaded base: the numbers differ, not the work.
        merged = model.unload()
    else:
        merged = model.merge_and_unload()
    record("merged", merged)
    unmerged = next(r for r in rows if r["model"] == "lora r16 all")["decode_tok_s"]
    merged_speed = rows[-1]["decode_tok_s"]
    ratio = unmerged / merged_speed
    print(f"{precision:>5} unmerged/merged decode: {ratio:.3f} ({'within' if ratio >= 0.85 else 'NOT within'} 15%)",
          flush=True)
    del model, merged
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=["bf16", "4bit", "both"], default="both")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="Also append each row to this JSON-lines file.")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("skipped: torch is not installed")
        return 0
    if not torch.cuda.is_available():
        print("skipped: chat latency is measured on a CUDA GPU and none is available")
        return 0
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · 7B-shaped Llama, random weights, "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, batch 1, greedy", flush=True)
    rows = []
    for precision in (["bf16", "4bit"] if args.precision == "both" else [args.precision]):
        rows += bench(precision, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
