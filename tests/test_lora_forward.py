"""The LoRA layer's training forward (ipylora.engine.lora_forward): PEFT's values and gradients,
with kept or deferred dropout, under autocast, on 4-bit bases; PEFT's own forward for the rest.
With dropout, q/k/v and gate/up share one mask (their A products stacked): the reference is PEFT's
model whose siblings share one dropout module (`shared_masks`), as PEFT's layer on a fused qkv does."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from ipylora.engine import dropout as lora_dropout
from ipylora.engine import lora_forward

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 250, 11, 7, 64], [9, 1, 300, 77, 2, 41, 6, 19, 120, 33]])


def tiny_pair(dropout: float = 0.0, device: str = "cpu", **lora):
    """(PEFT's model, a deep copy with the lean forward): the tiny model, an adapter on every linear
    layer with B not zero, so that the adapter changes the output."""
    from transformers import AutoModelForCausalLM

    from ipylora.engine.tiny import tiny_model_path

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32).to(device)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                        init_lora_weights=False, **lora)
    peft_model = get_peft_model(base, config).train()
    lean = copy.deepcopy(peft_model)
    assert lora_forward.sync(lean) == 14  # 2 layers x 7 linear layers
    return peft_model, lean


class _SharedDropout(torch.nn.Dropout):
    """One dropout module for siblings: the mask drawn for an input is reused for the same input."""

    last = None

    def forward(self, x):
        if self.last is None or self.last[0] is not x:
            self.last = (x, super().forward(x))
        return self.last[1]


def shared_masks(peft_model):
    """PEFT's model with q/k/v and gate/up of each block sharing one dropout module (none: no dropout)."""
    if not isinstance(peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"],
                      torch.nn.Dropout):
        return peft_model
    for block in peft_model.base_model.model.model.layers:
        for parent, names in ((block.self_attn, ("q_proj", "k_proj", "v_proj")), (block.mlp, ("gate_proj", "up_proj"))):
            shared = _SharedDropout(getattr(parent, names[0]).lora_dropout["default"].p)
            for name in names:
                getattr(parent, name).lora_dropout["default"] = shared
    return peft_model


def loss_and_grads(model, seed: int = 3, autocast: torch.dtype | None = None):
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(input_ids=IDS.to(device), labels=IDS.to(device))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach().float(), out.loss.item(), grads


def assert_same(expected, got, atol, params: int = 28):
    (logits, loss, grads), (logits2, loss2, grads2) = expected, got
    assert torch.allclose(logits, logits2, atol=atol)
    assert abs(loss - loss2) < atol
    assert grads.keys() == grads2.keys() and len(grads) == params  # A and B of 14 layers
    for name in grads:
        assert torch.allclose(grads[name], grads2[name], atol=atol, rtol=1e-4), name


@pytest.fixture(params=[False, True], ids=["stacked", "fused"])
def fused(request, monkeypatch):
    """Both paths of a plain layer: lora_forward's own (A products stacked) and lora_fused's node."""
    from ipylora.engine import lora_fused

    monkeypatch.setattr(lora_fused, "ENABLED", request.param)
    return request.param


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_values_and_gradients_are_peft_s(device, dropout, fused):
    """Kept dropout too: the same masks are drawn (a dropout module runs on the same input, siblings
    sharing one as the reference's do)."""
    peft_model, lean = tiny_pair(dropout, device)
    expected = loss_and_grads(shared_masks(peft_model))
    got = loss_and_grads(lean)
    assert_same(expected, got, atol=2e-5)
    assert not torch.equal(expected[0], loss_and_grads(lean, seed=4)[0]) or dropout == 0.0  # a real mask


def test_the_deferred_dropout_composes_with_it(fused):
    """dropout.py's lora_A (the mask drawn again in backward) under the lean forward: PEFT's gradients."""
    peft_model, lean = tiny_pair(0.2)
    assert lora_dropout.sync(lean) == (14, 0)
    assert_same(loss_and_grads(shared_masks(peft_model)), loss_and_grads(lean), atol=2e-5)


def test_siblings_share_one_product_and_hold_nothing_after_it(monkeypatch, fused):
    """q/k/v and gate/up: one A product each (lora_fused's node, or the stacked GEMM without it),
    nothing kept past the last sibling; STACK False gives each layer its own mask and product, PEFT's
    draws exactly."""
    from ipylora.engine import lora_fused

    peft_model, lean = tiny_pair(0.2)
    calls = []
    real_linear, real_fused = torch.nn.functional.linear, lora_fused.lora_linears
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: calls.append(w.shape[0]) or real_linear(x, w, b))
    monkeypatch.setattr(lora_fused, "lora_linears", lambda x, bases, a, *rest: calls.append(a.shape[0]) or
                        real_fused(x, bases, a, *rest))
    expected = loss_and_grads(shared_masks(copy.deepcopy(peft_model)))
    calls.clear()
    assert_same(expected, loss_and_grads(lean), atol=2e-5)
    ranks = sorted(rank for rank in calls if rank in (8, 16, 24))
    assert ranks == [8, 8] * 2 + [16] * 2 + [24] * 2  # o and down alone, gate+up, q+k+v, per block
    groups = {id(m.__dict__["_ipylora_siblings"][0]): m.__dict__["_ipylora_siblings"][0]
              for m in lean.modules() if "_ipylora_siblings" in m.__dict__}
    assert len(groups) == 8 and all(g.x is None and g.parts is None and not g.broken for g in groups.values())
    monkeypatch.setattr(lora_forward, "STACK", False)
    assert_same(loss_and_grads(peft_model), loss_and_grads(lean), atol=2e-5)


def test_siblings_given_different_inputs_compute_their_own():
    """A block whose q/k/v are not called with one input (here k reads a copy): right values, and
    after two such forwards the group stops stacking."""
    peft_model, lean = tiny_pair(0.0)
    for model in (peft_model, lean):
        for block in model.base_model.model.model.layers:
            k = block.self_attn.k_proj
            k.register_forward_pre_hook(lambda module, args: (args[0] * 1.0,))
    expected = loss_and_grads(peft_model)
    assert_same(expected, loss_and_grads(lean), atol=2e-5)
    assert_same(expected, loss_and_grads(lean), atol=2e-5)
    block = lean.base_model.model.model.layers[0]
    group = block.self_attn.q_proj.__dict__["_ipylora_siblings"][0]
    assert group.broken and group.x is None
    assert not block.mlp.gate_proj.__dict__["_ipylora_siblings"][0].broken


def test_under_autocast_the_sum_is_peft_s_to_bf16_rounding():
    peft_model, lean = tiny_pair(0.1)
    expected = loss_and_grads(shared_masks(peft_model), autocast=torch.bfloat16)
    got = loss_and_grads(lean, autocast=torch.bfloat16)
    assert abs(expected[1] - got[1]) < 1e-2 * abs(expected[1])
    for name, grad in expected[2].items():
        assert got[2][name].dtype == torch.float32  # the adapter's weights keep their dtype
        assert (got[2][name] - grad).norm() <= 0.05 * grad.norm() + 1e-6, name


def test_peft_s_forward_runs_where_the_lean_one_would_be_wrong():
    """Disabled or merged adapters, DoRA, and ENABLED False: PEFT's own output (the lean sum would
    add the adapter, or leave the magnitude out)."""
    peft_model, lean = tiny_pair()
    with torch.no_grad():
        with peft_model.disable_adapter(), lean.disable_adapter():
            assert torch.equal(peft_model(IDS).logits, lean(IDS).logits)
        plain = lean(IDS).logits
        lora_forward.ENABLED = False
        try:
            assert torch.equal(lean(IDS).logits, peft_model(IDS).logits)
        finally:
            lora_forward.ENABLED = True
        assert torch.allclose(plain, peft_model(IDS).logits, atol=1e-5)
        lean.merge_adapter()
        assert torch.allclose(lean(IDS).logits, plain, atol=1e-4)
        lean.unmerge_adapter()
    dora_peft, dora_lean = tiny_pair(use_dora=True)
    assert_same(loss_and_grads(dora_peft), loss_and_grads(dora_lean), atol=2e-5, params=42)  # and magnitudes


def test_restore_gives_peft_s_classes_back_and_the_type_checks_hold():
    from peft.tuners.lora.layer import Linear

    _, lean = tiny_pair()
    layers = [m for m in lean.modules() if isinstance(m, Linear)]
    assert len(layers) == 14 and all(type(m) is not Linear for m in layers)
    assert lora_forward.sync(lean) == 14  # again: nothing changes
    lora_forward.restore(lean)
    assert all(type(m) is Linear for m in layers)


def quantized_pair(dropout: float):
    """(PEFT's model, the same again with the lean forward), both over a fresh 4-bit tiny model on
    the CPU that has run no forward yet, checkpointed as the engine's 4-bit plan is."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ipylora.engine.models import _keep_4bit_layout_trainable
    from ipylora.engine.tiny import tiny_model_path

    models = []
    for _ in range(2):
        quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_path(), quantization_config=quantized,
                                                    device_map={"": "cpu"}, dtype=torch.float32)
        _keep_4bit_layout_trainable(base)
        for module in base.modules():  # as a layer built without a compute dtype: its first call sets one
            if hasattr(module, "compute_type_is_set"):
                module.compute_type_is_set = False
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(r=8, lora_dropout=dropout, target_modules="all-linear",
                                                init_lora_weights=False)).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        models.append(model)
    assert lora_forward.sync(models[1]) == 14
    return shared_masks(models[0]), models[1]


def test_a_fresh_checkpointed_4bit_model_recomputes_what_it_computed(fused):
    """The first forward of a 4-bit layer settles bitsandbytes' compute dtype: the fused node must be
    taken in that forward too, or the checkpointed recomputation would save other tensors."""
    pytest.importorskip("bitsandbytes")
    peft_model, lean = quantized_pair(0.1)
    for _ in range(2):
        assert_same(loss_and_grads(peft_model), loss_and_grads(lean), atol=2e-5)


def test_a_4bit_base_gives_peft_s_gradients(monkeypatch):
    """bitsandbytes' 4-bit layer (on the CPU): PEFT clones its output before adding; here the GEMM
    adds, in lora_fused's node (bitsandbytes' product, its weight dequantized for the input gradient)."""
    from ipylora.engine import lora_fused

    monkeypatch.setattr(lora_fused, "ENABLED", True)

    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ipylora.engine.models import _keep_4bit_layout_trainable
    from ipylora.engine.tiny import tiny_model_path

    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path(), quantization_config=quantized, device_map={"": "cpu"},
                                                dtype=torch.float32)
    _keep_4bit_layout_trainable(base)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_dropout=0.1, target_modules="all-linear",
                                                 init_lora_weights=False)).train()
    expected = loss_and_grads(shared_masks(peft_model))
    assert lora_forward.sync(peft_model) == 14
    assert {type(m).__mro__[1].__name__ for m in peft_model.modules() if hasattr(m, "lora_A")} == {"Linear4bit"}
    kinds = []
    real = lora_fused.lora_linears
    monkeypatch.setattr(lora_fused, "lora_linears", lambda x, bases, *rest: kinds.extend(map(lora_fused._kind, bases))
                        or real(x, bases, *rest))
    assert_same(expected, loss_and_grads(peft_model), atol=2e-5)
    assert kinds == ["nf4"] * 14


def test_a_checkpointed_model_gives_peft_s_gradients(fused):
    """Under activation checkpointing (the engine's 4-bit and long-row plans) each layer runs again
    in the backward pass, its in-place add included: the same dropout mask, the same gradients."""
    peft_model, lean = tiny_pair(0.2)
    for model in (shared_masks(peft_model), lean):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    assert_same(loss_and_grads(peft_model), loss_and_grads(lean), atol=2e-5)
