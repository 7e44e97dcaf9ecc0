"""Batched decoding for %lora_eval, --compare and samples: the captured batch step vs generate().

A random-init Qwen2-7B shape (bench.common.SHAPES, bf16, built on the GPU) with an r16 all-linear
adapter (B random too, so it changes every output), through the lean LoRA forward chat uses. The
same --prompts prompts (random ids, lengths spread over --min-len..--max-len) are answered greedily
with --new-tokens new tokens each, no stop token, so every recipe decodes the same number of tokens:

    generate b8     transformers' generate(), left-padded batches of 8 (what %lora_eval did)
    generate b64    the same, all prompts in one batch
    engine lean     graphdecode.decode_batch under decode.lean_lora: one decode step of up to 64 rows
                    captured as a CUDA graph and replayed per token, the adapter as two small products
                    a layer (its capture timed in the first call: "engine lean first")
    engine          ipylora.engine.chat.generate_batch, what evals run: the same, with the adapter
                    merged into copies of the weights (graphdecode.held_copies; since session 13 the
                    copies and the step captured on them are kept for the next call: "engine first"
                    makes them), the prompts prefilled as one packed row
    engine padded prefill   the same with the prompts prefilled as one left-padded batch (before session 13)
    engine compiled         (--compiled) the same with the step's decoder layers compiled (decode_layers.py,
                            GenerateArgs(compile=True)); "first" includes the compile; "engine again"
                            is the default after it

tokens/s = new tokens / wall seconds (prefill included). Tokens are compared with generate b64 (the
same left-padded batch): random weights make near-ties common, so the table gives the share of rows
whose answers are the same, and the same up to the first difference.

    python bench/batch_decode.py                   # 7B shape, 64 prompts, 128 new tokens
    python bench/batch_decode.py --smoke           # CPU plumbing check on the tiny shape
    python bench/batch_decode.py --liger           # with Liger's kernels, as a session that trained has them
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHAPES  # noqa: E402


def build(shape: dict, device: str, liger: bool = False):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape, initializer_range=0.02, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # no stop token: every recipe decodes every token
    if liger:
        from ipylora.engine.speed import _apply_liger

        notes: list[str] = []
        print(f"  liger applied: {_apply_liger(model, notes)} {' '.join(notes)}")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    return model.to(device).eval()


class Ids:
    """The tokenizer generate_batch asks for: pad and EOS ids, and a decode whose "text" is the ids."""
    pad_token_id, eos_token_id = 0, None

    def decode(self, ids, skip_special_tokens=True):
        return list(ids)


def timed(fn):
    import torch

    torch.cuda.synchronize() if torch.cuda.is_available() else None
    started = time.perf_counter()
    out = fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return out, time.perf_counter() - started


def profile(fn, steps: int, top: int = 15) -> None:
    """GPU time by kernel over `steps` calls of `fn` (kernels inside a replayed graph included)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in kernels) / steps
    by: dict[str, list] = {}
    for e in kernels:
        entry = by.setdefault(e.name, [0.0, 0])
        entry[0] += e.device_time / steps
        entry[1] += 1
    print(f"  profile: {total / 1e3:.2f} ms of kernels a step, {len(kernels) // steps} kernels a step")
    for name, (us, count) in sorted(by.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"    {us / 1e3:7.3f} ms {count // steps:5d}x  {name[:110]}")


def breakdown(engine, graphdecode) -> None:
    """One engine call with its prefills and whole batch decodes timed (synchronized around each)."""
    import torch

    spent = {"prefill": 0.0, "decode_batch": 0.0, "ready": 0.0}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timing(name, fn):
        def wrapped(*args, **kwargs):
            sync()
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                spent[name] += time.perf_counter() - started
        return wrapped

    saved = graphdecode.StepGraph.prefill_batch, graphdecode._decode_batch, graphdecode.StepGraph.ready
    graphdecode.StepGraph.prefill_batch = timing("prefill", saved[0])
    graphdecode._decode_batch = timing("decode_batch", saved[1])
    graphdecode.StepGraph.ready = timing("ready", saved[2])
    try:
        _, seconds = timed(engine)
    finally:
        graphdecode.StepGraph.prefill_batch, graphdecode._decode_batch, graphdecode.StepGraph.ready = saved
    steps = spent["decode_batch"] - spent["prefill"] - spent["ready"]
    print(f"  breakdown of one engine call: {seconds:.3f} s in all; prefill {spent['prefill']:.3f} s, "
          f"capture check {spent['ready']:.3f} s, decode loop {steps:.3f} s, "
          f"outside decode_batch (merge, sort, texts) {seconds - spent['decode_batch']:.3f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny shape on CPU (no capture there)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=40)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--no-b8", action="store_true", help="leave out generate b8 (the slowest recipe)")
    parser.add_argument("--profile", action="store_true", help="print where one captured batch step's GPU time goes")
    parser.add_argument("--liger", action="store_true", help="Liger's RMSNorm/RoPE/SwiGLU kernels on the model")
    parser.add_argument("--compiled", action="store_true",
                        help="also the engine with its decoder layers compiled (GenerateArgs(compile=True), decode_layers.py)")
    parser.add_argument("--breakdown", action="store_true", help="one more engine call, its prefill and decode timed apart")
    cli = parser.parse_args()
    import torch

    from ipylora.engine import chat, graphdecode
    from ipylora.engine.config import GenerateArgs
    from ipylora.engine.decode import lean_lora, merged_lora

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not cli.smoke:
        print("skipped: no CUDA GPU (run with --smoke for the CPU plumbing check)")
        return 0
    shape = SHAPES["tiny" if cli.smoke else "7b"]
    model = build(shape, device, cli.liger)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(cli.min_len, cli.max_len + 1, (cli.prompts,), generator=g).tolist()
    prompts = [torch.randint(5, shape["vocab_size"], (n,), generator=g).tolist() for n in lengths]
    args = GenerateArgs(max_new_tokens=cli.new_tokens)
    new = cli.prompts * cli.new_tokens

    def hf(batch: int) -> list[list[int]]:
        rows = []
        with torch.inference_mode(), lean_lora(model):
            for start in range(0, len(prompts), batch):
                part = prompts[start:start + batch]
                width = max(len(p) for p in part)
                ids = torch.tensor([[0] * (width - len(p)) + p for p in part], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in part], device=device)
                out = model.generate(ids, attention_mask=mask, max_new_tokens=cli.new_tokens, min_new_tokens=cli.new_tokens,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)
                rows += out[:, width:].tolist()
        return rows

    def engine_ids() -> list[list[int]]:  # generate_batch's loop, keeping the ids (it returns texts)
        with torch.inference_mode(), lean_lora(model):
            picker = graphdecode.picker(model, 0.0, 1.0)
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            found = {}
            for start in range(0, len(order), graphdecode.BATCH_ROWS):
                chunk = order[start:start + graphdecode.BATCH_ROWS]
                for i, ids in zip(chunk, graphdecode.decode_batch(model, [prompts[i] for i in chunk], 0, cli.new_tokens,
                                                                  picker, (), capture=device == "cuda")):
                    found[i] = ids
            return [found[i] for i in range(len(prompts))]

    def engine(compiled: bool = False) -> list[list[int]]:
        chosen = GenerateArgs(max_new_tokens=cli.new_tokens, compile=compiled)
        return [result["text"] for result in chat.generate_batch(model, Ids(), prompts, chosen)]

    def engine_padded() -> list[list[int]]:  # the prefill as one left-padded batch (before session 13)
        packs = graphdecode._packs_prompts
        graphdecode.release(model)
        graphdecode._packs_prompts = lambda *a: False
        try:
            return engine()
        finally:
            graphdecode._packs_prompts = packs
            graphdecode.release(model)

    hf(64)  # warm-up (cuBLAS, allocator)
    rows = []
    recipes = [] if cli.no_b8 else [("generate b8", lambda: hf(8))]
    for name, fn in (*recipes, ("generate b64", lambda: hf(64)),
                     ("engine lean first", engine_ids), ("engine lean", engine_ids),
                     ("engine padded prefill", engine_padded), ("engine first", engine), ("engine", engine),
                     *([("engine compiled first", lambda: engine(True)), ("engine compiled", lambda: engine(True)),
                        ("engine again", engine)] if cli.compiled else [])):
        out, seconds = timed(fn)
        rows.append((name, seconds, out))
        print(f"  {name}: {seconds:.2f} s, {new / seconds:,.0f} tokens/s", flush=True)
    if cli.breakdown:
        breakdown(engine, graphdecode)
        if cli.compiled:
            breakdown(lambda: engine(True), graphdecode)
    graphdecode.release(model)  # the engine's kept copies and step: the merged step below makes its own
    for label, merge in (("lean", False), ("merged", True)):  # one decode step's time, prefill left out
        with torch.inference_mode(), lean_lora(model), merged_lora(model, chat._merge_budget(model) if merge else 0) \
                as merged, graphdecode.folded_gqa():
            graph = graphdecode.step_graph(model, cli.max_len + cli.new_tokens, False, device == "cuda",
                                           batch=min(graphdecode.BATCH_ROWS, len(prompts)))
            graph.ready(graphdecode.state_key(model))
            graph.prefill_batch(prompts[:graph.batch], 0)
            token = torch.zeros(graph.batch, dtype=torch.long, device=device)
            graph.step(token, cli.max_len)
            _, seconds = timed(lambda: [graph.step(token, cli.max_len + i) for i in range(20)])
            print(f"  {label} batch step: {graph.batch} rows, cache {graph.max_len} tokens, "
                  f"{merged / 2**30:.1f} GiB merged, captured {'yes' if graph._graph is not None else 'no'}: "
                  f"{seconds / 20 * 1e3:.2f} ms")
            if cli.profile and device == "cuda":
                profile(lambda: [graph.step(token, cli.max_len + i) for i in range(10)], 10)
            graphdecode.release(model, chat=False)
    by = {name: (seconds, out) for name, seconds, out in rows}
    reference = by["generate b64"][1]
    print(f"\n{cli.prompts} prompts of {cli.min_len}-{cli.max_len} tokens, {cli.new_tokens} new tokens each, "
          f"{'Qwen2-tiny CPU' if cli.smoke else 'Qwen2-7B shape bf16'}, r16 all-linear adapter, greedy")
    print("| recipe | s | tokens/s | vs generate b64 | vs generate b8 | rows same as generate b64 | tokens same until first difference |")
    print("|---|---|---|---|---|---|---|")
    for name, seconds, out in rows:
        same = lead = "-"
        if isinstance(out, list) and out and isinstance(out[0], list):
            same = f"{sum(a == b for a, b in zip(out, reference)) / len(reference):.0%}"
            prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(out, reference))
            lead = f"{prefix / sum(len(b) for b in reference):.0%}"
        b8 = f"{by['generate b8'][0] / seconds:.1f}x" if "generate b8" in by else "-"
        print(f"| {name} | {seconds:.2f} | {new / seconds:,.0f} | {by['generate b64'][0] / seconds:.1f}x | {b8} "
              f"| {same} | {lead} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
