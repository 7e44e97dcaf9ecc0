"""Operators a training step dispatches, PEFT's LoRA forward against lora_forward.py's, with and
without its siblings' stacked A products and lora_fused.py's one node a group (CPU is enough).

    python bench/lora_ops.py

Counts every aten operator of one forward and backward (a TorchDispatchMode) of a random-init
Qwen2 with 28 layers of hidden 256 (the 1.5B shape's depth; the count follows the structure, not the
widths), r16 LoRA on every linear layer, dropout 0.05, and times five more steps on this machine's
CPU. On a GPU each operator that computes is a kernel launch, and each costs host time: the 1.5B
shape's GPU waits on the host half of each step (bench/RESULTS.md, session 15).
"""

from __future__ import annotations

import copy
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ipylora.engine import lora_forward, lora_fused

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    config = Qwen2Config(hidden_size=256, intermediate_size=704, num_hidden_layers=28, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024)
    torch.manual_seed(0)
    peft_model = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", init_lora_weights=False)).train()
    lean = copy.deepcopy(peft_model)
    lora_forward.sync(lean)
    ids = torch.randint(0, config.vocab_size, (1, 64))
    print("| forward | aten ops a step | CPU ms a step (64 tokens) | mm | addmm_ | mul | add | native_dropout |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model, stack, fused in (("PEFT's", peft_model, False, False),
                                      ("lora_forward.py, each layer alone (session 22)", lean, False, False),
                                      ("q/k/v's and gate/up's A stacked (the default)", lean, True, False),
                                      ("stacked, each group one node (lora_fused.py, off by default)", lean, True, True)):
        lora_forward.STACK, lora_fused.ENABLED = stack, fused
        with Count() as count:
            model(input_ids=ids, labels=ids).loss.backward()
        started = time.perf_counter()
        for _ in range(5):
            model.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
        ms = (time.perf_counter() - started) / 5 * 1e3
        ops = count.ops
        print(f"| {name} | {sum(ops.values()):,} | {ms:.0f} | {ops['aten.mm']} | {ops['aten.addmm_']} | "
              f"{ops['aten.mul']} | {ops['aten.add']} | {ops['aten.native_dropout']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
