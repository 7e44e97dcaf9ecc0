"""LoRA's A product with dropout, one layer, forward and backward: PyTorch's ways against the fused kernels.

For each shape (tokens x input width, rank 16, bf16, CUDA; the 7B training step's adapted inputs):

    no dropout      linear(x, A)                                   the cost dropout is measured against
    PEFT            linear(dropout(x), A)                          the dropped copy and mask kept
    drawn again     dropout.DropoutThenLinear                      torch.native_dropout again in backward
    fused           dropout.FusedDropoutLinear                     the mask made inside the kernels

Time of forward + backward (grad x and grad A) in a CUDA graph-free loop, median of --repeats after a
warm-up, and the bytes autograd keeps for backward. Issue #20 target 1: dropout at most 3% of a step
over no dropout; a 7B step has ~200 of these per micro-batch (7 a layer).

    python bench/dropout_kernels.py [--tokens 16384] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cuda_or_skip  # noqa: E402

SHAPES = [1536, 3584, 8960, 18944]  # hidden (q/k/v, o, gate/up inputs) and intermediate (down's input): Qwen2-1.5B, 7B


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--p", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not cuda_or_skip("no CUDA GPU (the kernels' values are checked on CPU by tests/test_dropout.py)"):
        return 0
    import torch

    from ipylora.engine.dropout import DropoutThenLinear, FusedDropoutLinear

    def recipes(p):
        return {
            "no dropout": lambda x, a: torch.nn.functional.linear(x, a),
            "PEFT": lambda x, a: torch.nn.functional.linear(torch.nn.functional.dropout(x, p, True), a),
            "drawn again": lambda x, a: DropoutThenLinear.apply(x, a, p),
            "fused": lambda x, a: FusedDropoutLinear.apply(x, a, p),
        }

    print(f"{torch.cuda.get_device_name()} · {args.tokens} tokens · rank {args.rank} · p {args.p} · bf16 autocast")
    print("| input width | recipe | fwd+bwd ms | vs no dropout | kept for backward MiB |")
    print("|---|---|---|---|---|")
    for width in SHAPES:
        x = torch.randn(args.tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        a = torch.randn(args.rank, width, device="cuda", dtype=torch.float32, requires_grad=True)
        grad = torch.randn(args.tokens, args.rank, device="cuda", dtype=torch.bfloat16)
        base = None
        for name, fn in recipes(args.p).items():
            def run():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = fn(x, a)
                out.backward(grad)

            for _ in range(3):
                run()
            times = []
            for _ in range(args.repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            kept = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t,
                                                          lambda t: t):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    fn(x, a)
            ms = statistics.median(times)
            base = ms if base is None else base
            # x itself is kept by every recipe (it is the layer's input, saved anyway): counted apart.
            extra = (sum(kept) - x.numel() * x.element_size()) / 2**20
            print(f"| {width} | {name} | {ms:.3f} | {ms / base:.2f}x | {extra:,.0f} beyond x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
