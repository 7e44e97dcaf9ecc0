"""LoRA dropout drawn again in the backward pass (ipylora.engine.dropout): PyTorch's values and
gradients for the same mask, the same mask in a checkpointed recomputation, less kept for backward."""

from __future__ import annotations

import pytest
import torch

from ipylora.engine import dropout as lora_dropout
from ipylora.engine.dropout import DeferredDropout, DropoutLinear, DropoutThenLinear

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def reference(x, weight, p, seed):
    """F.linear(dropout(x)) through autograd, with the mask PyTorch's dropout draws from `seed`."""
    torch.manual_seed(seed)
    _, keep = torch.native_dropout(x.detach().to(weight.dtype), p, True)
    return torch.nn.functional.linear(x * keep / (1 - p), weight), keep.float()


@pytest.mark.parametrize("device", DEVICES)
def test_values_and_gradients_equal_pytorch_for_the_same_mask(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 32, generator=g).to(device).requires_grad_()
    weight = torch.randn(8, 32, generator=g).to(device).requires_grad_()
    grad = torch.randn(3, 7, 8, generator=g).to(device)
    expected, keep = reference(x, weight, 0.3, seed=11)
    expected.backward(grad)
    expected_grads = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    torch.manual_seed(11)
    got = DropoutThenLinear.apply(x, weight, 0.3)
    torch.rand(5, device=device)  # the generator moves on before the backward pass
    got.backward(grad)
    assert 0.5 < float(keep.mean()) < 0.9  # a real mask, p = 0.3
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(x.grad, expected_grads[0], atol=1e-5)
    assert torch.allclose(weight.grad, expected_grads[1], atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_computes_in_its_dtype_as_f_linear_does(device):
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, generator=g).to(device, dtype).requires_grad_()
    weight = torch.randn(16, 64, generator=g).to(device).requires_grad_()  # fp32, as PEFT keeps LoRA weights
    with torch.autocast(device, dtype=dtype):
        torch.manual_seed(3)
        expected = torch.nn.functional.linear(torch.nn.functional.dropout(x, 0.1), weight)
        torch.manual_seed(3)
        got = DropoutThenLinear.apply(x, weight, 0.1)
    assert got.dtype == expected.dtype == dtype
    assert torch.equal(got, expected)
    got.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and x.grad.dtype == dtype


def test_a_checkpointed_layer_draws_the_same_mask_when_recomputed():
    """Under torch.utils.checkpoint the layer runs twice; the gradients are those of one run."""
    from torch.utils.checkpoint import checkpoint

    layer = DropoutLinear(32, 8)
    layer.dropout_p = 0.5
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(2)).requires_grad_()

    def grads(checkpointed: bool):
        torch.manual_seed(5)
        layer.zero_grad()
        x.grad = None
        out = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        torch.rand(3)  # other draws between the forward and the backward pass
        (out ** 2).sum().backward()
        return out.detach(), x.grad.clone(), layer.weight.grad.clone()

    plain, again = grads(False), grads(True)
    for a, b in zip(plain, again):
        assert torch.equal(a, b)


def peft_model(dropout: float, **config):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ipylora.engine.tiny import tiny_model_path

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path())
    return get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", lora_dropout=dropout,
                                           init_lora_weights=False, **config))


def saved_bytes(model, ids) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of one forward."""
    seen = {}

    def pack(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss
    return sum(seen.values())


def test_a_peft_model_keeps_for_backward_what_it_keeps_without_dropout_and_evaluates_as_before():
    ids = torch.randint(5, 1000, (4, 64), generator=torch.Generator().manual_seed(4))
    model = peft_model(0.1).train()
    with torch.no_grad():
        before = model.eval()(input_ids=ids).logits
    model.train()
    with_dropout = saved_bytes(model, ids)
    keys = set(model.state_dict())
    assert lora_dropout.sync(model) == (14, 0)  # 2 layers x 7 linear layers
    assert all(type(m.lora_A["default"]) is DropoutLinear and type(m.lora_dropout["default"]) is DeferredDropout
               for m in model.modules() if hasattr(m, "lora_A"))
    deferred = saved_bytes(model, ids)
    no_dropout = saved_bytes(peft_model(0.0).train(), ids)
    assert deferred < 0.75 * with_dropout
    assert deferred <= 1.02 * no_dropout
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, before)  # eval: no dropout, PEFT's product
        model.train()
        torch.manual_seed(1)
        first = model(input_ids=ids).logits
        torch.manual_seed(1)
        assert torch.equal(model(input_ids=ids).logits, first)  # the masks follow the seed
        assert not torch.allclose(first, model(input_ids=ids).logits)
    # Taken back: all of it, or the layers whose dropout went to 0 (a sweep's next trial).
    assert lora_dropout.sync(model, enabled=False) == (0, 14)
    assert all(type(m.lora_A["default"]) is torch.nn.Linear and type(m.lora_dropout["default"]) is torch.nn.Dropout
               for m in model.modules() if hasattr(m, "lora_A"))
    lora_dropout.sync(model)
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    layers[0].lora_dropout["default"] = torch.nn.Identity()
    assert lora_dropout.sync(model) == (13, 0) and type(layers[0].lora_A["default"]) is torch.nn.Linear


def test_variants_keep_peft_dropout():
    model = peft_model(0.1, use_dora=True)
    assert lora_dropout.sync(model) == (0, 14)
    assert not any(isinstance(m, (DropoutLinear, DeferredDropout)) for m in model.modules())


def test_the_plan_draws_dropout_again_only_where_memory_binds():
    """speed._plan_dropout: drawn again where the kept copies would force activation checkpointing or
    cost a quarter of the tokens a step; kept (PEFT's way, faster) otherwise, a deferred model put back."""
    from ipylora.engine.speed import BatchPlan, _plan_dropout

    model = peft_model(0.1)

    def plan(checkpointing: bool, tokens: int) -> BatchPlan:
        return BatchPlan(checkpointing, tokens, 8, 1, 8, 1 << 30, 1000.0)

    def deferred_layers() -> int:
        return sum(isinstance(m, DropoutLinear) for m in model.modules())

    notes = []
    tight, roomy = plan(True, 8000), plan(False, 8000)
    assert _plan_dropout(model, tight, roomy, None, notes) is roomy and deferred_layers() == 14
    assert "no activation checkpointing" in notes[-1]
    assert _plan_dropout(model, plan(False, 8000), plan(False, 9000), None, notes) .step_tokens == 8000
    assert deferred_layers() == 0  # kept: PEFT's dropout is back
    assert _plan_dropout(model, plan(False, 4000), plan(False, 9000), None, notes).step_tokens == 9000
    assert deferred_layers() == 14 and "more tokens a step" in notes[-1]
    assert _plan_dropout(model, tight, roomy, False, notes) is tight and deferred_layers() == 0
    assert _plan_dropout(model, roomy, roomy, True, notes) is roomy and deferred_layers() == 14


# -- the fused kernels (dropout_kernels: the mask made inside A's product and its gradients) ----

def _fmix32(h):
    h = h & 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def fused_reference_mask(seed: int, rows: int, width: int, threshold: int):
    """The kernels' mask, computed with PyTorch's integer ops: MurmurHash3's finalizer of each element's index."""
    index = torch.arange(rows)[:, None] * width + torch.arange(width)[None, :]
    return (_fmix32(index ^ _fmix32(torch.tensor(seed))) & 0xFFFF) >= threshold


@pytest.fixture()
def fused_device():
    from ipylora.engine import gemv

    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if not gemv.interpreted():
        pytest.skip("no GPU, and Triton's interpreter is off")
    return "cpu"


@pytest.mark.parametrize("shape,rank", [((3, 13, 96), 16), ((70, 200), 8)])
def test_fused_dropout_values_and_gradients_match_pytorch_with_the_same_mask(fused_device, shape, rank):
    """FusedDropoutLinear against linear(x * mask * scale, A) in PyTorch, with the mask the kernels
    compute (rebuilt here from the seed the forward draws): output, grad x and grad A, rows and
    widths that do not fill the last block, a rank under the kernels' 16."""
    from ipylora.engine.dropout import FusedDropoutLinear

    torch.manual_seed(0)
    x = torch.randn(*shape, device=fused_device, requires_grad=True)
    weight = torch.randn(rank, shape[-1], device=fused_device, requires_grad=True)
    p = 0.3
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (1,), device=fused_device, dtype=torch.int64))
    torch.manual_seed(7)
    out = FusedDropoutLinear.apply(x, weight, p)
    grad = torch.randn_like(out)
    out.backward(grad)
    threshold = round(p * 65536)
    rows = x.numel() // shape[-1]
    mask = fused_reference_mask(seed, rows, shape[-1], threshold).view(shape).to(fused_device)
    scale = 65536 / (65536 - threshold)
    x2 = x.detach().clone().requires_grad_(True)
    w2 = weight.detach().clone().requires_grad_(True)
    expected = torch.nn.functional.linear(x2 * mask * scale, w2)
    expected.backward(grad)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.05
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)
    assert torch.allclose(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    assert torch.allclose(weight.grad, w2.grad, atol=1e-4, rtol=1e-4)


def test_fused_dropout_masks_are_fresh_each_call_and_the_same_when_recomputed(fused_device):
    """Two calls draw two masks (the seed comes from the default generator); a checkpointed layer,
    whose generator state is put back before its recomputation, gets the same mask again: its
    gradients equal the plain call's."""
    from ipylora.engine.dropout import FusedDropoutLinear

    torch.manual_seed(1)
    x = torch.randn(64, 128, device=fused_device)
    weight = torch.randn(16, 128, device=fused_device)
    one, two = FusedDropoutLinear.apply(x, weight, 0.5), FusedDropoutLinear.apply(x, weight, 0.5)
    assert not torch.allclose(one, two)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(3)
        xi, wi = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if checkpointed:
            out = torch.utils.checkpoint.checkpoint(FusedDropoutLinear.apply, xi, wi, 0.5, use_reentrant=False)
        else:
            out = FusedDropoutLinear.apply(xi, wi, 0.5)
        (out ** 2).sum().backward()
        grads.append((out.detach(), xi.grad, wi.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_deferred_lora_layers_take_the_fused_kernels_when_asked(fused_device, monkeypatch):
    """dropout.KERNEL = "fused": a deferred PEFT model's A layers run FusedDropoutLinear, train, and
    leave the gradients flowing to the input (a checkpointed model needs them)."""
    from ipylora.engine import dropout

    calls = []
    original = dropout.FusedDropoutLinear.apply
    monkeypatch.setattr(dropout.FusedDropoutLinear, "apply", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(dropout, "KERNEL", "fused")
    model = peft_model(0.1).to(fused_device).train()
    assert dropout.sync(model)[0] == 14
    ids = torch.randint(5, 500, (2, 12), device=fused_device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert len(calls) == 14 and torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_auto_kernel_fuses_only_the_wide_inputs(fused_device, monkeypatch):
    """dropout.KERNEL = "auto" (the default): the fused kernel runs for inputs at least
    FUSED_MIN_WIDTH wide (down_proj's, the intermediate width), the others draw again with torch."""
    from ipylora.engine import dropout

    fused, redrawn = [], []
    original_fused, original_torch = dropout.FusedDropoutLinear.apply, dropout.DropoutThenLinear.apply
    monkeypatch.setattr(dropout.FusedDropoutLinear, "apply", lambda x, *a: fused.append(x.shape[-1]) or original_fused(x, *a))
    monkeypatch.setattr(dropout.DropoutThenLinear, "apply", lambda x, *a: redrawn.append(x.shape[-1]) or original_torch(x, *a))
    assert dropout.KERNEL == "auto"
    model = peft_model(0.1).to(fused_device).train()
    config = model.config
    monkeypatch.setattr(dropout, "FUSED_MIN_WIDTH", config.intermediate_size)
    assert dropout.sync(model)[0] == 7 * config.num_hidden_layers
    ids = torch.randint(5, 500, (2, 12), device=fused_device)
    model(input_ids=ids, labels=ids).loss.backward()
    assert fused == [config.intermediate_size] * config.num_hidden_layers
    assert set(redrawn) == {config.hidden_size} and len(redrawn) == 6 * config.num_hidden_layers
