"""One token through one linear layer on a GPU: ipylora's gemv kernel against cuBLAS.

For each layer shape of the 7B decode benches (Llama-7B, which bench/chat_latency.py builds, and
Qwen2-7B) it times, inside a CUDA graph as the captured decode step runs them:

    cublas      torch's F.linear on the bf16 weight (cuBLAS)
    gemv        ipylora.engine.gemv on the same weight, at its default tiling and the best of a grid
    + lora      the kernel with an r16 adapter's B (A x) added in it

With --nf4, the same shapes as bitsandbytes' 4-bit layers (nf4, double quantization, bf16 compute,
the QLoRA layout), instead:

    bnb nf4     bitsandbytes' Linear4bit forward for one token (its gemv kernel)
    gemv nf4 fp32   ipylora.engine.gemv's fp32 kernel over the codes repacked by gemv.nf4_spec
                    (gemv.NF4_MMA = False)
    gemv nf4 mma pdl    its tensor-core kernel over its own repacked copy (the code book in a
                    shared-memory table), as a programmatic dependent launch (back to back, a call's
                    table fill and first codes overlap the call before; gemv.PDL, off by default)
    gemv nf4 mma    the same as the engine launches it, at its default tiling and with --grid the
                    best of (warps, groups a warp a loop, programs a tile); layers of up to 1,024
                    rows get the fp32 kernel here (gemv.NF4_MMA_MAX_SMALL)
    + lora          the same with an r16 adapter's term

With --nf4 --stacks, the sibling layers that read one input (q/k/v, gate/up of Llama-7B and Qwen2-7B)
each with an r16 adapter, one kernel a layer (`layers`) against one kernel over gemv.nf4_stack's copy
of all of them (`stacked`, chat's default: gemv.NF4_STACK).

and prints microseconds a call, the bandwidth that is (weight bytes read / time; layers under
~50 MB are read partly from the L2 cache when called back to back, so theirs can pass the GPU's
4.3 TB/s) and the largest difference from the reference. --grid tries every tiling and prints the best, which is how
gemv.config's choices were made.

    python bench/decode_kernels.py [--grid] [--nf4 [--stacks]] [--json out.jsonl]

Without CUDA it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cuda_or_skip  # noqa: E402

# (name, out_features, in_features)
SHAPES = [("llama7b q/k/v/o", 4096, 4096), ("llama7b gate/up", 11008, 4096), ("llama7b down", 4096, 11008),
          ("qwen2-7b q/o", 3584, 3584), ("qwen2-7b k/v", 512, 3584), ("qwen2-7b gate/up", 18944, 3584),
          ("qwen2-7b down", 3584, 18944)]
# (name, siblings' out_features, in_features)
STACKS = [("llama7b q+k+v", (4096, 4096, 4096), 4096), ("llama7b gate+up", (11008, 11008), 4096),
          ("qwen2-7b q+k+v", (3584, 512, 512), 3584), ("qwen2-7b gate+up", (18944, 18944), 3584)]
CALLS = 20  # calls captured in one graph, so that launch gaps count as they do in the decode step


def timed(fn, replays: int = 20) -> float:
    """Microseconds a call of `fn`, captured CALLS times in one CUDA graph and replayed."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * CALLS)


def record(args, **fields) -> None:
    """Append one row to --json's file (JSON lines), if one was given."""
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps(fields) + "\n")


def report(args, label: str, kernel: str, us: float, nbytes: int, diff: float, tiling="") -> None:
    """Print one row (and record it): microseconds a call, the TB/s of `nbytes`."""
    tb_s = nbytes / us / 1e6
    print(f"{label:<18} {kernel:<14} {us:7.2f} {tb_s:6.2f} {diff:9.2e}  {tiling}", flush=True)
    record(args, layer=label, kernel=kernel, us=us, tb_s=tb_s, max_diff=diff, tiling=tiling)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", action="store_true", help="time every tiling and print the best")
    parser.add_argument("--layers", default="", help="only the layers whose name contains this (e.g. llama7b)")
    parser.add_argument("--nf4", action="store_true", help="4-bit layers: bitsandbytes' kernel against gemv's nf4 one")
    parser.add_argument("--stacks", action="store_true", help="with --nf4: sibling layers one a kernel or stacked")
    parser.add_argument("--json", default=None, help="also append each row to this JSON-lines file")
    args = parser.parse_args()
    if not cuda_or_skip("the kernels are timed on a CUDA GPU and none is available"):
        return 0
    import torch

    from ipylora.engine import gemv

    if args.nf4 and args.stacks:
        return stack_rows(args)
    if args.nf4:
        return nf4_rows(args)

    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · one token, bf16, {CALLS} calls a graph")
    print(f"{'layer':<18} {'kernel':<14} {'us':>7} {'TB/s':>6} {'max diff':>9}  tiling")
    torch.manual_seed(0)
    for label, out_features, in_features in [shape for shape in SHAPES if args.layers in shape[0]]:
        linear = torch.nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, 1, in_features, device="cuda", dtype=torch.bfloat16)
        t = torch.randn(16, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(out_features, 16, device="cuda", dtype=torch.bfloat16) * 0.01
        dense = gemv.spec(linear, torch.bfloat16)
        dense_bytes = linear.weight.numel() * 2
        with torch.no_grad():
            reference = linear(x).float()

        def row(kernel, us, diff, tiling=""):
            report(args, label, kernel, us, dense_bytes, diff, tiling)

        def err(got, expected):
            return float((got.float() - expected).abs().max())

        with torch.no_grad():
            row("cublas", timed(lambda: linear(x)), err(linear(x), reference))
            row("gemv", timed(lambda: gemv.gemv(x, dense)), err(gemv.gemv(x, dense), reference), str(gemv.config(dense)))
            row("gemv + lora", timed(lambda: gemv.gemv(x, dense, t, b)),
                err(gemv.gemv(x, dense, t, b), reference + (t.float() @ b.float().t())))
            if not args.grid:
                continue
            best = None
            for rows, chunk, warps in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024, 2048), (2, 4, 8)):
                if rows * chunk > 16384 or rows * chunk < 256:
                    continue
                try:
                    us = timed(lambda: gemv.gemv(x, dense, tuning=(rows, chunk, warps)), replays=5)
                except Exception as exc:  # a tiling Triton cannot build (registers, shared memory)
                    print(f"  {(rows, chunk, warps)} failed: {type(exc).__name__}", flush=True)
                    continue
                if best is None or us < best[0]:
                    best = (us, (rows, chunk, warps))
            row("gemv best", best[0], 0.0, str(best[1]))
        del linear
        torch.cuda.empty_cache()
    return 0


def nf4_layer(out_features: int, in_features: int):
    """bitsandbytes' Linear4bit (nf4, double quantization, bf16 compute) over a random weight, on the GPU."""
    import bitsandbytes as bnb
    import torch

    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                              quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
    return layer.cuda()


def stack_rows(args) -> int:
    import bitsandbytes as bnb
    import torch

    from ipylora.engine import gemv

    gemv.NF4 = gemv.NF4_MMA = gemv.NF4_STACK = True
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · one token, nf4 siblings with r16 adapters, "
          f"{CALLS} calls a graph")
    print(f"{'layers':<18} {'kernel':<14} {'us':>7} {'TB/s':>6} {'max diff':>9}  tiling")
    torch.manual_seed(0)
    for label, outs, in_features in [stack for stack in STACKS if args.layers in stack[0]]:
        layers = [nf4_layer(out, in_features) for out in outs]
        nbytes = sum(layer.weight.numel() + layer.weight.quant_state.absmax.numel() for layer in layers)
        x = torch.randn(1, 1, in_features, device="cuda", dtype=torch.bfloat16)
        t = torch.randn(16 * len(outs), device="cuda", dtype=torch.bfloat16)
        bs = [torch.randn(out, 16, device="cuda", dtype=torch.bfloat16) * 0.01 for out in outs]
        with torch.no_grad():
            reference = torch.cat([x.float() @ bnb.functional.dequantize_4bit(layer.weight.data,
                                                                              layer.weight.quant_state).float().t()
                                   + t[16 * i:16 * i + 16].float() @ b.float().t()
                                   for i, (layer, b) in enumerate(zip(layers, bs))], dim=-1)
        specs = [gemv.spec(layer, torch.bfloat16) for layer in layers]
        spec, spans = gemv.nf4_stack(layers, torch.bfloat16)
        b, t_index = gemv.stack_terms(spec, spans, bs)

        def apart():  # a kernel a layer, each with its adapter
            return [gemv.gemv(x, s, t[16 * i:16 * i + 16], layer_b) for i, (s, layer_b) in enumerate(zip(specs, bs))]

        def err(got):
            return float((got.float() - reference).abs().max() / reference.abs().max())

        with torch.no_grad():
            report(args, label, "layers", timed(apart), nbytes, err(torch.cat(apart(), dim=-1)),
                   " ".join(str(gemv.config(s)) for s in specs))
            stacked = gemv.gemv(x, spec, t, b, t_index=t_index)
            report(args, label, "stacked", timed(lambda: gemv.gemv(x, spec, t, b, t_index=t_index)), nbytes,
                   err(torch.cat([stacked[..., span] for span in spans], dim=-1)), str(gemv.config(spec)))
        del layers, specs, spec
        torch.cuda.empty_cache()
    return 0


def nf4_rows(args) -> int:
    import bitsandbytes as bnb
    import torch

    from ipylora.engine import gemv

    gemv.NF4 = True  # whatever the engine's default; both nf4 kernels are timed
    pdl = gemv.PDL
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · one token, nf4 (double quant), bf16 compute, "
          f"{CALLS} calls a graph; TB/s of nf4 codes and scales as bitsandbytes stores them")
    print(f"{'layer':<18} {'kernel':<14} {'us':>7} {'TB/s':>6} {'max diff':>9}  tiling")
    torch.manual_seed(0)
    for label, out_features, in_features in [shape for shape in SHAPES if args.layers in shape[0]]:
        layer = nf4_layer(out_features, in_features)
        state = layer.weight.quant_state
        nbytes = layer.weight.numel() + state.absmax.numel()
        x = torch.randn(1, 1, in_features, device="cuda", dtype=torch.bfloat16)
        t = torch.randn(16, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(out_features, 16, device="cuda", dtype=torch.bfloat16) * 0.01
        gemv.NF4_MMA = False
        fp32_spec = gemv.spec(layer, torch.bfloat16)
        layer.__dict__.pop(gemv._NF4, None)  # the next spec is a copy of its own
        gemv.NF4_MMA = True
        spec = gemv.spec(layer, torch.bfloat16)
        with torch.no_grad():
            reference = x.float() @ bnb.functional.dequantize_4bit(layer.weight.data, state).float().t()

        def row(kernel, us, diff, tiling=""):
            report(args, label, kernel, us, nbytes, diff, tiling)

        def err(got, expected):
            return float((got.float() - expected).abs().max() / expected.abs().max())

        with torch.no_grad():
            row("bnb nf4", timed(lambda: layer(x)), err(layer(x), reference))
            if spec is None:
                print(f"{label:<18} gemv nf4: no spec for this layer", flush=True)
                continue
            if fp32_spec is not None:
                row("gemv nf4 fp32", timed(lambda: gemv.gemv(x, fp32_spec)), err(gemv.gemv(x, fp32_spec), reference),
                    str(gemv.config(fp32_spec)))
            gemv.PDL = True
            row("gemv nf4 mma pdl", timed(lambda: gemv.gemv(x, spec)), err(gemv.gemv(x, spec), reference),
                str(gemv.config(spec)))
            gemv.PDL = pdl
            row("gemv nf4 mma", timed(lambda: gemv.gemv(x, spec)), err(gemv.gemv(x, spec), reference),
                str(gemv.config(spec)))
            row("gemv nf4 mma + lora", timed(lambda: gemv.gemv(x, spec, t, b)),
                err(gemv.gemv(x, spec, t, b), reference + (t.float() @ b.float().t())))
            if args.grid:  # (warps, groups a warp a loop, programs a tile) of the tensor-core kernel
                best = None
                for tiling in itertools.product((2, 4, 8, 16), (1, 2, 4), (1, 2, 4)):
                    try:
                        us = timed(lambda: gemv.gemv(x, spec, tuning=tiling), replays=5)
                    except Exception as exc:  # a tiling Triton cannot build
                        print(f"  {tiling} failed: {type(exc).__name__}", flush=True)
                        continue
                    record(args, layer=label, kernel="grid", us=us, tiling=str(tiling))
                    if best is None or us < best[0]:
                        best = (us, tiling)
                row("gemv nf4 mma best", best[0], err(gemv.gemv(x, spec, tuning=best[1]), reference), str(best[1]))
        del layer, spec, fp32_spec
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
