"""The generation-time LoRA forward (ipylora.engine.decode) gives PEFT's results, and only where it may."""

from __future__ import annotations

import pytest
import torch

from ipylora.engine.decode import _CACHED, lean_lora


def lora_model(**config):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ipylora.engine.tiny import tiny_model_path

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path())
    # init_lora_weights=False: B is random too, so the adapter changes every output.
    options = dict(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, LoraConfig(**{**options, **config}))
    return model.eval()


def patched_layers(model) -> list:
    return [m for m in model.modules() if "forward" in m.__dict__]


@pytest.fixture(scope="module")
def model():
    return lora_model()


IDS = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(3))


def test_same_logits_and_tokens_as_peft(model):
    with torch.inference_mode():
        reference = model(IDS).logits
        expected = model.generate(IDS[:1], max_new_tokens=24, do_sample=False)
        with lean_lora(model) as count:
            assert count == 14  # 2 layers x 7 linear layers
            logits = model(IDS).logits
            tokens = model.generate(IDS[:1], max_new_tokens=24, do_sample=False)
    assert torch.allclose(logits, reference, atol=1e-5)
    assert torch.equal(tokens, expected)
    assert patched_layers(model) == []  # PEFT's forward is back after the block


def test_patch_removed_when_the_block_raises(model):
    with pytest.raises(RuntimeError), lean_lora(model):
        raise RuntimeError("generation failed")
    assert patched_layers(model) == []


def test_left_to_peft_when_adapters_are_disabled_merged_or_variants(model):
    with model.disable_adapter(), lean_lora(model) as count:
        assert count == 0
    dora = lora_model(use_dora=True)
    with lean_lora(dora) as count:
        assert count == 0
    merged = lora_model()
    merged.merge_adapter()
    with lean_lora(merged) as count:
        assert count == 0


def test_cached_forward_reused_until_the_weights_change():
    model = lora_model()
    layer = next(m for m in model.modules() if hasattr(m, "lora_A"))
    with torch.inference_mode():
        with lean_lora(model):
            first = layer.__dict__[_CACHED][1]
        with lean_lora(model):
            assert layer.__dict__[_CACHED][1] is first  # same function: a compiled graph stays valid
        with torch.no_grad():  # training changes adapter weights in place
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(2.0)
        reference = model(IDS).logits
        with lean_lora(model):
            assert layer.__dict__[_CACHED][1] is not first
            logits = model(IDS).logits
    assert torch.allclose(logits, reference, atol=1e-5)


def test_compiled_single_token_form_matches_peft():
    """Inside torch.compile one token's LoRA is written as two reductions; same numbers as PEFT."""
    from transformers import StaticCache

    model = lora_model()
    inner = model.get_base_model()
    step = torch.compile(inner.__call__)
    results = []
    with torch.inference_mode():
        for compiled in (False, True):
            cache = StaticCache(config=inner.config, max_cache_len=32)
            inner(IDS[:1], cache=cache, cache_position=torch.arange(12))
            token = IDS[:1, -1:]
            if compiled:
                with lean_lora(model):
                    results.append(step(token, cache=cache, cache_position=torch.tensor([12])).logits)
            else:
                results.append(inner(token, cache=cache, cache_position=torch.tensor([12])).logits)
    assert torch.allclose(results[0], results[1], atol=1e-4)


def test_a_base_layer_with_another_output_dtype_gets_the_same_sum():
    """An 8-bit base returns fp16 to a model computing in bf16: the LoRA sum is cast, not skipped."""
    import torch.nn.functional as F

    model = lora_model()
    layer = next(m for m in model.modules() if hasattr(m, "lora_A"))
    linear = layer.base_layer
    linear.forward = lambda x: F.linear(x, linear.weight, linear.bias).to(torch.float64)
    x = torch.randn(2, 3, linear.in_features)
    with torch.inference_mode():
        expected = layer(x)
        with lean_lora(model):
            got = layer(x)
    assert got.dtype == expected.dtype == torch.float64
    assert torch.allclose(got, expected, atol=1e-5)


def step_logits(model, *forms) -> tuple:
    """The logits of one decode step (the 13th token of IDS[0] after the first 12 prefilled into a
    static cache) run inside the context managers `forms`, and what they yielded."""
    import contextlib

    from transformers import StaticCache

    inner = model.get_base_model()
    cache = StaticCache(config=inner.config, max_cache_len=32)
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        inner(IDS[:1], cache=cache, cache_position=torch.arange(12))
        yielded = [stack.enter_context(form) for form in forms]
        return inner(IDS[:1, -1:], cache=cache, cache_position=torch.tensor([12])).logits, yielded


def test_capture_form_with_shared_a_products_matches_peft():
    """While a decode step is captured, one token's LoRA runs as small compiled kernels and q/k/v
    (and gate/up) share one stacked A product: same logits as PEFT, one group per sibling set."""
    from ipylora.engine import decode

    model = lora_model()
    expected, _ = step_logits(model)
    got, _ = step_logits(model, lean_lora(model), decode.capturing())
    groups = {id(m.__dict__[decode._GROUP][0]) for m in model.modules() if decode._GROUP in m.__dict__}
    assert torch.allclose(expected, got, atol=1e-4)
    # Per block: q/k/v, o_proj (the same input width, but another input: a group of its own), gate/up
    # and down.
    assert len(groups) == 2 * 4


def test_merged_copies_give_peft_logits_within_the_budget_and_leave_the_base_alone(model):
    """merged_lora: the layers merged (largest first, while their copies fit the budget) give PEFT's
    logits, the base weights are untouched, and lean_lora's forwards are back after the block."""
    from ipylora.engine.decode import merged_lora

    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    bases = [m.base_layer.weight.clone() for m in layers]
    sizes = sorted((m.base_layer.weight.numel() * 4 for m in layers), reverse=True)
    with torch.inference_mode():
        reference = model(IDS).logits
        with lean_lora(model):
            lean = {id(m): m.forward for m in layers}
            with merged_lora(model, 0) as merged:
                assert merged == 0 and all(m.forward is lean[id(m)] for m in layers)
            with merged_lora(model, sizes[0] + sizes[1]) as merged:
                assert merged == sizes[0] + sizes[1]  # the two largest, and nothing else fits beside them
                assert sum(m.forward is not lean[id(m)] for m in layers) == 2
            with merged_lora(model, 1 << 40) as merged:
                assert merged == sum(sizes)
                logits = model(IDS).logits
            assert all(m.forward is lean[id(m)] for m in layers)
    assert torch.allclose(logits, reference, atol=1e-5)
    assert all(torch.equal(m.base_layer.weight, w) for m, w in zip(layers, bases))
    assert patched_layers(model) == []


def test_a_4bit_base_is_merged_into_a_dequantized_copy():
    """merged_lora on a bitsandbytes 4-bit model (CPU): each adapted layer's copy is its nf4 weight
    dequantized plus scale B A, in the compute dtype; the logits are the 4-bit model's own."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ipylora.engine.decode import merged_lora
    from ipylora.engine.models import _keep_4bit_layout_trainable
    from ipylora.engine.tiny import tiny_model_path

    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path(), quantization_config=quantized, device_map={"": "cpu"},
                                                dtype=torch.float32)
    _keep_4bit_layout_trainable(base)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)).eval()
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert layers and all(type(m.base_layer).__name__ == "Linear4bit" for m in layers)
    with torch.inference_mode():
        reference = model(IDS).logits
        with lean_lora(model), merged_lora(model, 1 << 40) as merged:
            logits = model(IDS).logits
    assert merged == sum(m.base_layer.out_features * m.base_layer.in_features * 4 for m in layers)
    assert torch.allclose(logits, reference, atol=1e-4)
