"""The decode step with its layers compiled (decode_layers.py) on every family of the model matrix.

For each family of tests/model_matrix.py (tiny random-init checkpoints with an r8 adapter on every
linear layer), 8 greedy tokens after a 20-token prompt, through graphdecode.decode with the
layers eager and then compiled, and a table of: whether the tokens are the same, how many graphs
dynamo compiled, its graph breaks, the seconds the compiled answer took (the compile included) and
the warning the step gave, if any. On CPU the step runs uncaptured; on a GPU it is captured.

    python bench/compiled_decode_matrix.py                 # all families
    python bench/compiled_decode_matrix.py gemma3 qwen3-moe
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> int:
    import model_matrix
    import torch
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from ipylora.engine import graphdecode
    from ipylora.engine.decode import lean_lora

    device = "cuda" if torch.cuda.is_available() else "cpu"
    root = Path(tempfile.mkdtemp())
    names = sys.argv[1:] or [family.name for family in model_matrix.FAMILIES]
    print("| family | same tokens | graphs | graph breaks | compiled answer s | warning |")
    print("|---|---|---|---|---|---|")
    for name in names:
        family = model_matrix.BY_NAME[name]
        if not model_matrix.available(family):
            print(f"| {name} | - | - | - | - | not in this transformers |")
            continue
        path = model_matrix.build(family, root / name)
        base = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
        prompt = list(range(40, 60))
        torch._dynamo.reset()
        counters.clear()
        with torch.inference_mode(), lean_lora(model), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pick = graphdecode.picker(model, 0.0, 1.0)
            expected = graphdecode.decode(model, prompt, 8, pick, (), capture=False)
            graphdecode.release(model)
            started = time.perf_counter()
            got = graphdecode.decode(model, prompt, 8, pick, (), compiled=True, capture=device == "cuda")
            seconds = time.perf_counter() - started
        graphdecode.release(model)
        said = sorted({str(w.message).split(":")[0][:90] for w in caught if "failed" in str(w.message)})
        print(f"| {name} | {'yes' if got == expected else 'NO'} | {counters['stats']['unique_graphs']} "
              f"| {sum(counters['graph_break'].values())} | {seconds:.1f} | {'; '.join(said) or '-'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
