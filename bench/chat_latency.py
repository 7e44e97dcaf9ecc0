"""Chat latency on a GPU: time to first token and decode tokens/s, base vs unmerged vs merged adapter.

A 7B-shaped Llama (hidden 4096, 32 layers, MLP 11008, vocab 32000) with random weights is built
directly on the GPU (no hub, no disk), in bf16 and with its linear layers quantized to 4-bit nf4
(bitsandbytes, double quant, bf16 compute: the QLoRA layout). On each it measures greedy
generation of --new-tokens tokens after a --prompt-tokens prompt (KV cache, batch 1):

    base            the model alone
    peft r16 all    ipylora's default adapter for real models (r 16 on every linear layer),
                    unmerged, through PEFT's own LoRA forward
    lean r16 all    the same adapter, unmerged, through `ipylora.engine.decode.lean_lora` (one mm
                    and one addmm per adapted layer; in a captured step, small compiled kernels)
    copies r16 all  the adapter merged into copies of the weights made for the call
                    (`ipylora.engine.decode.merged_lora`, what chat runs where memory allows), the
                    base untouched; for 4-bit, the nf4 weights dequantized into bf16 copies
    merged          the r16 adapter merged into the weights (merge_and_unload; for 4-bit, the nf4
                    base layout that a merged-and-requantized model has)

each decoded three ways (--modes):

    generate        transformers' generate() with its dynamic cache (what chat did before)
    graph           ipylora.engine.graphdecode: static cache, the decode step captured as a CUDA
                    graph and replayed per token (what chat does on CUDA)
    compiled        the same step after torch.compile (`%lora_chat --compile`); its first call
                    (compile + capture) is timed

Token times are taken when each token reaches the host (the one sync per token that streaming
needs), so they are what a chat user sees. Time to first token is prefill + the first pick;
decode tokens/s is over the remaining tokens. It also checks the captured step's logits against
the plain forward. The acceptance check: unmerged decode within 15% of merged, same mode.

    python bench/chat_latency.py                      # both precisions, all modes
    python bench/chat_latency.py --precision bf16 --modes graph --new-tokens 64 --repeats 2
    python bench/chat_latency.py --smoke              # CPU plumbing check (no capture on CPU)

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
from ipylora.engine import gemv as _gemv  # noqa: E402

_GEMV_AVAILABLE = _gemv.available

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


def _clock():
    """on_token callback and the list of times at which each token reached the host."""
    times = []
    return times, (lambda token: times.append(time.perf_counter()))


def _sync():
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def measure(model, mode: str, prompt_tokens: int, new_tokens: int, repeats: int, lean: bool = False,
            copies: bool = False, profile: bool = False) -> dict:
    """Median time to first token (s) and decode tokens/s over `repeats` greedy answers after one
    warm-up (whose time, capture and compile included, is `first_call_s`).

    mode "generate": transformers' generate() (dynamic cache): what chat did before graphdecode.
    mode "graph": ipylora.engine.graphdecode, the captured decode step (chat's default on CUDA).
    mode "compiled": the same after torch.compile (`%lora_chat --compile`).
    `copies`: the adapter merged into copies of the weights for the call (decode.merged_lora);
    `profile`: print where a captured step's GPU time goes.
    """
    import torch
    from transformers.generation.streamers import BaseStreamer

    from ipylora.engine import graphdecode
    from ipylora.engine.decode import lean_lora, merged_lora

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 30000, (1, prompt_tokens), generator=generator).to(DEVICE)
    ttft, decode, first_call = [], [], None
    with contextlib.ExitStack() as stack:
        if lean:
            stack.enter_context(lean_lora(model))
        if copies:
            stack.enter_context(merged_lora(model, 1 << 40))
        stack.enter_context(torch.inference_mode())
        for i in range(repeats + 1):
            times, on_token = _clock()
            _sync()
            start = time.perf_counter()
            if mode == "generate":
                class Clock(BaseStreamer):
                    prompt_seen = False  # the first put is the prompt

                    def put(self, value):
                        if self.prompt_seen:
                            on_token(value)
                        self.prompt_seen = True

                    def end(self):
                        pass

                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
                                     top_k=None, eos_token_id=None, streamer=Clock())
                assert out.shape[1] == prompt_tokens + new_tokens
            else:
                out = graphdecode.decode(model, ids[0].tolist(), new_tokens, graphdecode.picker(model, 0.0, 1.0), (),
                                         on_token=on_token, compiled=mode == "compiled")
                assert len(out) == new_tokens
            if i == 0:
                first_call = time.perf_counter() - start
                continue
            ttft.append(times[0] - start)
            decode.append((len(times) - 1) / (times[-1] - times[0]))
        if profile and mode != "generate" and DEVICE == "cuda":
            from bench.batch_decode import profile as kernel_profile
            from ipylora.engine.models import base_of

            graph = base_of(model).__dict__[graphdecode._SLOT]
            token = torch.zeros(1, dtype=torch.long, device=DEVICE)
            kernel_profile(lambda: [graph.step(token, prompt_tokens + i) for i in range(20)], 20, top=25)
        if mode != "generate":  # before the merged copies (if any) go: the step reads them
            graphdecode.release(model)
    return {"ttft_s": statistics.median(ttft), "decode_tok_s": statistics.median(decode), "first_call_s": first_call}


def check_graph(model, prompt_tokens: int, steps: int = 8, capture: bool = True) -> float:
    """Largest |logit difference| / largest |logit| between the decode loop's step (lean adapter;
    captured unless `capture` is false) and the plain forward over the same tokens, for the prompt's
    last token and `steps` decode steps after it."""
    import torch

    from ipylora.engine import graphdecode
    from ipylora.engine.decode import lean_lora

    ids = torch.randint(100, 30000, (1, prompt_tokens + steps), generator=torch.Generator().manual_seed(2)).tolist()[0]
    with torch.inference_mode():
        reference = model(torch.tensor([ids], device=DEVICE)).logits[0, prompt_tokens - 1:].float()
        with lean_lora(model):
            graph = graphdecode.step_graph(model, len(ids), compiled=False, capture=capture and DEVICE == "cuda")
            graph.ready(graphdecode.state_key(model))
            rows = [graph.prefill(ids[:prompt_tokens])]
            for i in range(steps):
                rows.append(graph.step(torch.tensor([ids[prompt_tokens + i]], device=DEVICE), prompt_tokens + i).clone())
        got = torch.cat(rows).float()
    graphdecode.release(model)
    return float((got - reference).abs().max() / reference.abs().max())


def _use_gemv(model, on: bool) -> None:
    """Captured steps with ipylora.engine.gemv's one-token kernels (chat's default) or without
    (the kernels of PyTorch / bitsandbytes, and LoRA as small compiled kernels after them)."""
    from ipylora.engine import decode, gemv

    gemv.available = _GEMV_AVAILABLE if on else (lambda: False)
    decode.forget(model)  # the lean forwards found their kernel once
    decode.drop_kernels(model)


def bench(precision: str, args) -> list[dict]:
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_model(precision)
    rows = []
    modes = args.modes.split(",")

    if args.liger:
        from ipylora.engine.speed import _apply_liger

        notes = []
        print(f"{precision:>5} Liger applied: {_apply_liger(model, notes)} {notes}", flush=True)

    def record(label, m, lean=False, copies=False):
        from ipylora.engine import gemv, graphdecode

        defaults = gemv.NF4, gemv.NF4_MMA, gemv.NF4_STACK, gemv.PDL
        for slots in args.slot_writes.split(","):
            graphdecode.SLOT_WRITES = slots == "on"
            for kernels in args.gemv.split(","):
                for nf4 in args.nf4.split(",") if args.nf4 and precision == "4bit" else [None]:
                    if nf4 is not None:  # off: bitsandbytes' kernels; the rest: see --nf4
                        gemv.NF4, gemv.NF4_MMA = nf4 != "off", nf4 in ("nostack", "on", "pdl")
                        gemv.NF4_STACK, gemv.PDL = nf4 in ("on", "pdl"), nf4 == "pdl"
                    _use_gemv(m, kernels == "on")
                    _record(label + ("" if args.gemv == "on" else f" gemv {kernels}")
                            + ("" if nf4 is None else f" nf4 {nf4}")
                            + ("" if args.slot_writes == "on" else f" slots {slots}"), m, lean, copies)
        graphdecode.SLOT_WRITES = True
        gemv.NF4, gemv.NF4_MMA, gemv.NF4_STACK, gemv.PDL = defaults

    def _record(label, m, lean=False, copies=False):
        for mode in modes:
            if label.split()[0] not in getattr(args, f"{mode}_models").split(","):
                continue
            torch._dynamo.reset()
            try:
                result = measure(m, mode, args.prompt_tokens, args.new_tokens, args.repeats, lean=lean,
                                 copies=copies, profile=args.profile)
            except Exception as exc:  # a variant that fails is reported, not fatal
                result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            row = {"precision": precision, "mode": mode, "model": label, **result,
                   "gpu_gib": torch.cuda.max_memory_allocated() / 2**30}
            rows.append(row)
            if args.json:  # written as it goes, so a run cut short keeps what it measured
                with open(args.json, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
            if "error" in row:
                print(f"{precision:>5} {mode:<8} {label:<13} FAILED {row['error']}", flush=True)
                continue
            print(f"{precision:>5} {mode:<8} {label:<13} TTFT {row['ttft_s'] * 1000:7.1f} ms   decode "
                  f"{row['decode_tok_s']:7.1f} tok/s   first call {row['first_call_s']:6.1f} s   "
                  f"peak {row['gpu_gib']:5.1f} GiB", flush=True)

    record("base", model)
    model = add_adapter(model, "default", 16, ALL_LINEAR)
    print(f"{precision:>5} captured step vs plain forward, lean r16 all: max |dlogit| / max |logit| = "
          f"{check_graph(model, args.prompt_tokens):.2e}", flush=True)
    record("peft r16 all", model)
    record("lean r16 all", model, lean=True)
    record("copies r16 all", model, lean=True, copies=True)  # 4-bit: dequantized copies (decode.merged_forwards)
    if precision == "4bit":
        # A merged 4-bit model (dequantize, add B·A, re-quantize) has exactly the base's nf4 layout and
        # kernels, so its speed is measured on the unloaded base: the numbers differ, not the work.
        merged = model.unload()
    else:
        merged = model.merge_and_unload()
    record("merged", merged)
    for mode in modes:
        speed = {r["model"]: r.get("decode_tok_s") for r in rows if r["mode"] == mode}
        reference = speed.get("merged") or (speed.get("base") if precision == "4bit" else None)
        for label in [r["model"] for r in rows if r["mode"] == mode and "r16" in r["model"]]:
            if speed.get(label) and reference:
                ratio = speed[label] / reference
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
    parser.add_argument("--modes", default="generate,graph,compiled",
                        help="generate (transformers' loop), graph (captured step), compiled (graph + torch.compile).")
    parser.add_argument("--generate-models", default="base,peft,lean,merged", help="Models measured with generate().")
    parser.add_argument("--graph-models", default="base,peft,lean,copies,merged", help="Models measured with the graph loop.")
    parser.add_argument("--compiled-models", default="lean,merged", help="Models measured compiled (each compiles).")
    parser.add_argument("--gemv", default="on", help="on, off or off,on: captured steps with/without gemv's kernels")
    parser.add_argument("--nf4", default=None,
                        help="any of off, fp32, nostack, on, pdl (e.g. off,nostack,on): 4-bit layers through "
                             "bitsandbytes' kernel, gemv's fp32 nf4 kernel, its tensor-core one a layer at a time, with "
                             "q/k/v and gate/up stacked (gemv.NF4_STACK), and that as a programmatic dependent launch "
                             "(default: the engine's, gemv.NF4, NF4_MMA, NF4_STACK and PDL)")
    parser.add_argument("--slot-writes", default="on",
                        help="on, off or off,on: the step writes its cache slot at its position (graphdecode.slot_layer) "
                             "or from each layer's counter (transformers' StaticLayer)")
    parser.add_argument("--liger", action="store_true", help="apply Liger's RMSNorm/RoPE/SwiGLU kernels first")
    parser.add_argument("--profile", action="store_true", help="print where a captured step's GPU time goes")
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
