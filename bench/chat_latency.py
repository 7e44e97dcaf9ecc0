"""Chat latency on a GPU: time to first token and decode tokens/s, base vs unmerged vs merged adapter.

A 7B-shaped Llama (hidden 4096, 32 layers, MLP 11008, vocab 32000) with random weights is built
directly on the GPU (no hub, no disk), in bf16 and with its linear layers quantized to 4-bit nf4
(bitsandbytes, double quant, bf16 compute: the QLoRA layout). On each it measures greedy
generation of --new-tokens tokens after a --prompt-tokens prompt (KV cache, batch 1):

    base            the model alone
    peft r16 all    ipylora's default adapter for real models (r 16 on every linear layer),
                    unmerged, through PEFT's own LoRA forward (what chat did before)
    lean r16 all    the same adapter, unmerged, through `ipylora.engine.decode.lean_lora` (what
                    chat does now: two kernels per adapted layer)
    peft/lean r64 q,v   the seed recipe's adapter (r 64 on q_proj and v_proj), unmerged
    merged          the r16 adapter merged into the weights (merge_and_unload; for 4-bit, the nf4
                    base layout that a merged-and-requantized model has)

each in eager mode (transformers' dynamic cache, as chat runs) and, with --compiled, with a static
cache and transformers' automatic torch.compile (CUDA graphs), whose first call (compile) is timed.
Token times are taken when each token reaches the host (a streamer), with no extra
synchronisation, so they are what a chat user sees. Time to first token is prefill + the first
step; decode tokens/s is over the remaining steps. The acceptance check: unmerged decode within
15% of merged.

    python bench/chat_latency.py --compiled           # both precisions, eager and compiled
    python bench/chat_latency.py --precision bf16 --new-tokens 64 --repeats 2

Without CUDA it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import quantize_4bit  # noqa: E402

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
SMOKE_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024)
DEVICE = "cuda"
LAYERS = None  # --layers: a shorter stack of the same layers (quick diagnostics)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(precision: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(SHAPE if DEVICE == "cuda" else SMOKE_SHAPE)
    if LAYERS:
        shape["num_hidden_layers"] = LAYERS
    config = LlamaConfig(**shape, initializer_range=0.02, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    if precision == "4bit":
        quantize_4bit(model, torch.bfloat16)
    model.eval()
    model.generation_config.pad_token_id = 0
    return model


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


def measure(model, prompt_tokens: int, new_tokens: int, repeats: int, lean: bool = False,
            compiled: bool = False) -> dict:
    """Median time to first token (s) and decode tokens/s over `repeats` greedy generations (after warm-up)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from ipylora.engine.decode import lean_lora

    class Clock(BaseStreamer):
        """Records when each new token reaches the host; the first put is the prompt."""

        def __init__(self):
            self.times = []
            self.prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self):
            pass

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 30000, (1, prompt_tokens), generator=generator).to(DEVICE)
    extra = dict(cache_implementation="static", max_cache_len=prompt_tokens + new_tokens + 64) if compiled else {}
    ttft, decode, first_call = [], [], None
    warmups = 2 if compiled else 1  # CUDA graphs are recorded on the second call
    with contextlib.ExitStack() as stack:
        if lean:
            stack.enter_context(lean_lora(model))
        for i in range(repeats + warmups):
            clock = Clock()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
                                     top_k=None, eos_token_id=None, streamer=clock, **extra)
            assert out.shape[1] == prompt_tokens + new_tokens
            if i == 0:
                first_call = time.perf_counter() - start
            if i < warmups:
                continue
            ttft.append(clock.times[0] - start)
            decode.append((len(clock.times) - 1) / (clock.times[-1] - clock.times[0]))
    return {"ttft_s": statistics.median(ttft), "decode_tok_s": statistics.median(decode), "first_call_s": first_call}


def bench(precision: str, args) -> list[dict]:
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_model(precision)
    rows = []

    def record(label, m, lean=False, compiled=False):
        mode = "compiled" if compiled else "eager"
        torch._dynamo.reset()
        try:
            result = measure(m, args.prompt_tokens, args.new_tokens, args.repeats, lean=lean, compiled=compiled)
        except Exception as exc:  # a variant that does not compile is reported, not fatal
            result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        row = {"precision": precision, "mode": mode, "model": label, **result,
               "gpu_gib": torch.cuda.max_memory_allocated() / 2**30}
        rows.append(row)
        if args.json:  # written as it goes, so a run cut short keeps what it measured
            with open(args.json, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        if "error" in row:
            print(f"{precision:>5} {mode:<8} {label:<13} FAILED {row['error']}", flush=True)
            return
        print(f"{precision:>5} {mode:<8} {label:<13} TTFT {row['ttft_s'] * 1000:7.1f} ms   decode "
              f"{row['decode_tok_s']:7.1f} tok/s   first call {row['first_call_s']:6.1f} s   peak {row['gpu_gib']:5.1f} GiB",
              flush=True)

    from ipylora.engine import decode

    def compiled_lean(label, lora_model):
        for form in args.forms.split(","):
            decode.COMPILED_FORM = form
            record(f"{label} {form}", lora_model, lean=True, compiled=True)
            decode.forget(lora_model)  # new functions: the next form is traced afresh
        decode.COMPILED_FORM = "reduce"

    wanted = set(args.compiled_models.split(",")) if args.compiled else set()
    if "base" in wanted:
        record("base", model, compiled=True)
    eager = set(args.eager_models.split(","))
    if "base" in eager:
        record("base", model)
    model = add_adapter(model, "seed", 64, ["q_proj", "v_proj"])
    if "seed" in eager:
        record("peft r64 q,v", model)
        record("lean r64 q,v", model, lean=True)
    model = add_adapter(model, "default", 16, ALL_LINEAR)
    if "peft" in eager:
        record("peft r16 all", model)
    if "lean" in eager:
        record("lean r16 all", model, lean=True)
    if "peft" in wanted:
        record("peft r16 all", model, compiled=True)
    if "lean" in wanted:
        compiled_lean("lean r16 all", model)
    model.delete_adapter("seed")
    if precision == "4bit":
        # A merged 4-bit model (dequantize, add B·A, re-quantize) has exactly the base's nf4 layout and
        # kernels, so its speed is measured on the unloaded base: the numbers differ, not the work.
        merged = model.unload()
    else:
        merged = model.merge_and_unload()
    if "merged" in eager:
        record("merged", merged)
    if "merged" in wanted:
        record("merged", merged, compiled=True)
    modes = [False, True] if args.compiled else [False]
    for compiled in modes:
        mode = "compiled" if compiled else "eager"
        speed = {r["model"]: r.get("decode_tok_s") for r in rows if r["mode"] == mode}
        for label in [r["model"] for r in rows if r["mode"] == mode and "r16" in r["model"]]:
            if speed.get(label) and speed.get("merged"):
                ratio = speed[label] / speed["merged"]
                print(f"{precision:>5} {mode:<8} {label} / merged decode: {ratio:.3f} "
                      f"({'within' if ratio >= 0.85 else 'NOT within'} 15%)", flush=True)
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
    parser.add_argument("--layers", type=int, default=None, help="Decoder layers (default: the 7B shape's 32).")
    parser.add_argument("--smoke", action="store_true", help="CPU plumbing check: a 2-layer model, bf16 only.")
    parser.add_argument("--compiled", action="store_true",
                        help="Also measure static cache + torch.compile (CUDA graphs) decoding.")
    parser.add_argument("--eager-models", default="base,seed,peft,lean,merged",
                        help="Which of base,seed,peft,lean,merged to measure in eager mode.")
    parser.add_argument("--compiled-models", default="peft,lean,merged",
                        help="With --compiled: which of base,peft,lean,merged to compile.")
    parser.add_argument("--forms", default="reduce",
                        help="With --compiled: lean forms to compile (reduce,mm; see ipylora/engine/decode.py).")
    parser.add_argument("--json", default=None, help="Also append each row to this JSON-lines file.")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("skipped: torch is not installed")
        return 0
    global LAYERS
    LAYERS = args.layers
    if args.smoke:
        global DEVICE
        DEVICE = "cpu"
        for name in ("empty_cache", "reset_peak_memory_stats"):
            setattr(torch.cuda, name, lambda: None)
        torch.cuda.max_memory_allocated = lambda: 0
        args.precision = "bf16"
    elif not torch.cuda.is_available():
        print("skipped: chat latency is measured on a CUDA GPU and none is available")
        return 0
    print(f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else 'CPU smoke'} · torch {torch.__version__} · 7B-shaped Llama, random weights, "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, batch 1, greedy", flush=True)
    rows = []
    for precision in (["bf16", "4bit"] if args.precision == "both" else [args.precision]):
        rows += bench(precision, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
