"""The decode step's one-token kernel (ipylora.engine.gemv) gives PyTorch's results, and only where it may.

On a GPU the kernel runs compiled; off one, in Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py) on CPU tensors: the same kernel source."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from ipylora.engine import gemv  # noqa: E402


@pytest.fixture()
def device():
    """Where the kernels run: CUDA, or the CPU through the interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    if not gemv.interpreted():
        pytest.skip("no GPU, and Triton's interpreter is off")
    return "cpu"


@pytest.fixture()
def interpreted(device):
    if device != "cpu":
        pytest.skip("checks the interpreter's CPU path")


# (out, in): rows that do not fill the last program, rows longer than one chunk and not a multiple of it.
SHAPES = [(40, 384), (96, 1536), (7, 64)]


@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_dense_kernel_matches_linear_with_and_without_the_adapter_term(device, out_features, in_features, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias, device=device)
    x = torch.randn(1, 1, in_features, device=device)
    spec = gemv.spec(linear, torch.float32)
    assert spec is not None
    assert torch.allclose(gemv.gemv(x, spec), linear(x), atol=1e-5)
    t, b = torch.randn(16, device=device), torch.randn(out_features, 16, device=device) * 0.1
    expected = linear(x) + t @ b.t()
    got = gemv.gemv(x, spec, t, b)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
    # A rank that is not a power of two (the kernel pads it) and the GPU's tilings of the same
    # product (the interpreter's default takes 16 rows a program).
    t, b = t[:12], b[:, :12].contiguous()
    for tiling in ((1, 512, 4), (2, 64, 1), (8, 2048, 8)):
        assert torch.allclose(gemv.gemv(x, spec, t, b, tuning=tiling), linear(x) + t @ b.t(), atol=1e-5)
    # In bf16, as chat runs it: fp32 sums, one rounding at the end.
    linear, x, t, b = linear.to(torch.bfloat16), x.to(torch.bfloat16), t.to(torch.bfloat16), b.to(torch.bfloat16)
    expected = x.float() @ linear.weight.float().t() + (linear.bias.float() if bias else 0) + t.float() @ b.float().t()
    got = gemv.gemv(x, gemv.spec(linear, torch.bfloat16), t, b)
    assert got.dtype == torch.bfloat16 and (got.float() - expected).abs().max() <= 0.01 * expected.abs().max()


def test_layers_the_kernel_does_not_take_keep_their_forward(interpreted):
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    linear = torch.nn.Linear(64, 32)
    assert gemv.spec(linear, torch.bfloat16) is None  # another dtype than the compute dtype
    assert gemv.spec(Conv1D(32, 64), torch.float32) is None  # GPT-2's transposed layout
    assert gemv.spec(torch.nn.Embedding(10, 8), torch.float32) is None
    # 4-bit layers keep bitsandbytes' kernel (gemv.py says why).
    nf4 = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    nf4.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")._quantize("cpu")
    assert gemv.spec(nf4, torch.bfloat16) is None


def test_no_spec_off_cuda_without_the_interpreter(interpreted, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert gemv.spec(torch.nn.Linear(64, 32), torch.float32) is None


def test_captured_form_runs_the_kernels_and_gives_peft_logits(interpreted, monkeypatch):
    """In the decode step's captured form every adapted layer (and the plain ones) runs one kernel:
    the logits are PEFT's."""
    from ipylora.engine import decode
    from tests.test_decode import lora_model, step_logits

    model = lora_model()
    calls = []
    original = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda x, spec, *rest, **kw: calls.append(len(rest)) or original(x, spec, *rest, **kw))
    expected, _ = step_logits(model)
    got, (_, _, plain) = step_logits(model, decode.lean_lora(model), decode.capturing(),
                                     decode.kernel_linears(model.get_base_model()))
    adapted = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    assert calls.count(2) == adapted  # each LoRA layer: base and adapter in one kernel
    assert plain >= adapted  # their base layers were offered the plain kernel too (unused here)
    assert torch.allclose(expected, got, atol=1e-4)
    assert not any("forward" in m.__dict__ for m in model.modules())  # every forward restored


def test_a_compiled_step_keeps_the_layers_own_forward(interpreted):
    """Under torch.compile (--compile) the patched layers trace their own forward: inductor makes that
    step's kernels, and the compile needs no Triton launch from Python."""
    from ipylora.engine import decode

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
    x = torch.randn(1, 64)
    with torch.no_grad(), decode.kernel_linears(model) as patched:
        launched = []
        original = gemv.gemv
        gemv.gemv = lambda *args, **kwargs: launched.append(1) or original(*args, **kwargs)
        try:
            compiled = torch.compile(lambda v: model(v), fullgraph=True, dynamic=False)(x)
            eager = model(x)
        finally:
            gemv.gemv = original
    assert patched == 2 and len(launched) == 2  # the eager call ran the kernels, the compiled one did not
    assert torch.allclose(compiled, eager, atol=1e-5)


def test_merged_copies_run_the_kernel_in_the_captured_form(interpreted, monkeypatch):
    """Chat's and evals' merged weight copies (decode.merged_lora) run gemv's kernel for one token in
    the captured step, with no adapter term left to add, q/k/v and gate/up each as one kernel over
    their stacked copies: PEFT's logits."""
    from ipylora.engine import decode
    from tests.test_decode import lora_model, step_logits

    model = lora_model()
    calls = []
    original = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda x, spec, *rest, **kw: calls.append(len(rest)) or original(x, spec, *rest, **kw))
    expected, _ = step_logits(model)
    got, (_, merged, _) = step_logits(model, decode.lean_lora(model), decode.merged_lora(model, 1 << 40),
                                      decode.capturing())
    blocks = len(model.get_base_model().model.layers)
    assert merged > 0 and calls == [0] * 4 * blocks  # q/k/v stacked, o, gate/up stacked, down: four kernels a block
    assert torch.allclose(expected, got, atol=1e-4)


def test_stacked_copies_with_biases_give_peft_logits(interpreted):
    """Qwen2's q/k/v have biases and fewer key/value heads: their stacked copy (rows of different
    heights, biases stacked with them) gives PEFT's logits in the captured form and out of it."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ipylora.engine import decode
    from tests.test_decode import step_logits

    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    for module in base.modules():
        if getattr(module, "bias", None) is not None:
            torch.nn.init.normal_(module.bias, std=0.5)  # zero biases would hide a misplaced one
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)).eval()
    expected, _ = step_logits(model)
    captured, _ = step_logits(model, decode.lean_lora(model), decode.merged_lora(model, 1 << 40), decode.capturing())
    eager, _ = step_logits(model, decode.lean_lora(model), decode.merged_lora(model, 1 << 40))
    assert torch.allclose(expected, captured, atol=1e-4) and torch.allclose(expected, eager, atol=1e-4)


@pytest.mark.parametrize("merge", [False, True])
def test_compiled_decode_layers_run_the_kernel_as_an_operator(device, merge, monkeypatch):
    """Inside torch.compile of the decode step (decode_layers.py, `%lora_chat --compile`), one token's
    layers still run the kernel, through the custom operator ipylora::gemv: the unmerged adapter's
    layers with its term, the merged copies stacked (q/k/v, gate/up: 4 launches a layer, not 7), with
    the eager step's logits."""
    from ipylora.engine import graphdecode
    from ipylora.engine.decode import capturing, kernel_linears, lean_lora, merged_lora
    from tests.test_graphdecode import gqa_lora_model

    model = gqa_lora_model(layers=2, vocab=256).to(device)
    launched = []
    launch = gemv._launch
    monkeypatch.setattr(gemv, "_launch", lambda *args: launched.append(args[1].shape) or launch(*args))

    def steps(compiled: bool) -> list:
        graphdecode.release(model)
        with torch.inference_mode(), lean_lora(model), merged_lora(model, 10**9 if merge else 0), \
                graphdecode.folded_gqa():
            graph = graphdecode.step_graph(model, 16, compiled, capture=False)
            token = graph.prefill([5, 6, 7, 8]).argmax(-1)
            out = []
            with capturing(True), kernel_linears(model), graph._compiling():
                for position in range(4, 8):
                    graph.token.copy_(token.view(1, 1))
                    graph.position.fill_(position)
                    out.append(graph._step().float().clone())
                    token = out[-1].argmax(-1)
        graphdecode.release(model)
        return out

    expected = steps(False)
    launched.clear()
    torch._dynamo.reset()
    got = steps(True)
    assert len(launched) == 4 * 2 * (4 if merge else 7)
    assert max((a - b).abs().max().item() for a, b in zip(expected, got)) < 1e-4
