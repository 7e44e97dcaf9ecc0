"""The captured-step decode loop (ipylora.engine.graphdecode) answers as transformers' generate() does.

On CPU the step runs uncaptured (capture=False), or a failed capture falls back to it; the
captured replay itself is checked against the uncaptured loop where CUDA is available.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from ipylora.engine import chat, graphdecode
from ipylora.engine.config import GenerateArgs
from ipylora.engine.decode import lean_lora
from tests.test_decode import IDS, lora_model

PROMPT = IDS[0].tolist()


@pytest.fixture(scope="module")
def model():
    return lora_model()


def hf_tokens(model, **sampling) -> list[int]:
    output = model.generate(IDS[:1], attention_mask=torch.ones_like(IDS[:1]), max_new_tokens=24, eos_token_id=None,
                            **sampling)
    return output[0, IDS.shape[1]:].tolist()


def loop_tokens(model, temperature=0.0, top_p=1.0, capture=False, **kw) -> list[int]:
    next_token = graphdecode.picker(model, temperature, top_p)
    return graphdecode.decode(model, PROMPT, kw.pop("max_new_tokens", 24), next_token, kw.pop("eos", None),
                              capture=capture, **kw)


def test_greedy_tokens_equal_generate(model):
    with torch.inference_mode(), lean_lora(model):
        expected = hf_tokens(model, do_sample=False)
        got = loop_tokens(model)
        again = loop_tokens(model)  # the second answer reuses the cache (stale slots masked)
    assert got == expected and again == expected
    graphdecode.release(model)


def test_sampled_tokens_equal_generate_with_the_same_seed(model):
    """Temperature, the config's top-k and top-p are transformers' own warpers, drawn in the same order."""
    with torch.inference_mode(), lean_lora(model):
        torch.manual_seed(7)
        expected = hf_tokens(model, do_sample=True, temperature=0.9, top_p=0.8)
        torch.manual_seed(7)
        got = loop_tokens(model, temperature=0.9, top_p=0.8)
    assert got == expected
    assert len(set(got)) > 3


def test_repetition_penalty_from_the_model_config_is_applied(model):
    config = model.get_base_model().generation_config
    config.repetition_penalty = 1.3
    try:
        with torch.inference_mode(), lean_lora(model):
            expected = hf_tokens(model, do_sample=False)
            got = loop_tokens(model)
            config.no_repeat_ngram_size = 2  # a processor the loop does not have: generate() instead
            assert graphdecode.picker(model, 0.0, 1.0) is None
    finally:
        config.repetition_penalty = 1.0
        config.no_repeat_ngram_size = 0
    assert got == expected


def test_stops_at_eos_and_on_request(model):
    with torch.inference_mode(), lean_lora(model):
        full = loop_tokens(model)
        eos = full[5]
        assert loop_tokens(model, eos=eos) == full[:full.index(eos) + 1]
        seen = []
        got = loop_tokens(model, on_token=seen.append, should_stop=lambda: len(seen) >= 3)
    assert got == seen == full[:3]


def test_the_cache_grows_for_longer_prompts_and_is_released(model):
    with torch.inference_mode(), lean_lora(model):
        loop_tokens(model, max_new_tokens=4)
        first = graphdecode.step_graph(model, len(PROMPT) + 4, compiled=False, capture=False)
        assert first.max_len == graphdecode.CACHE_STEP
        assert graphdecode.step_graph(model, 100, compiled=False, capture=False) is first
        bigger = graphdecode.step_graph(model, graphdecode.CACHE_STEP + 1, compiled=False, capture=False)
        assert bigger is not first and bigger.max_len == 2 * graphdecode.CACHE_STEP
    graphdecode.release(model)
    assert graphdecode._SLOT not in model.get_base_model().__dict__


def test_state_key_follows_the_adapter_state():
    model = lora_model()
    with torch.inference_mode():
        with lean_lora(model):
            lean = graphdecode.state_key(model)
        with lean_lora(model):
            assert graphdecode.state_key(model) == lean  # same forwards: the graph is reused
        with model.disable_adapter(), lean_lora(model):
            assert graphdecode.state_key(model) != lean
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_B" in n).mul_(2.0)  # trained in place
        with lean_lora(model):
            assert graphdecode.state_key(model) != lean


def test_chat_through_the_loop_falls_back_when_capture_fails(model, monkeypatch, tiny_tokenizer):
    """Chat's own path (usable models) on CPU: capture fails (no CUDA), one warning, the same answer,
    and streaming and Stop work as with generate()."""
    args = GenerateArgs(max_new_tokens=16)
    expected = chat.generate(model, tiny_tokenizer, PROMPT, args)
    monkeypatch.setattr(graphdecode, "usable", lambda m: True)
    pieces = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = chat.generate(model, tiny_tokenizer, PROMPT, args, on_text=pieces.append)
        again = chat.generate(model, tiny_tokenizer, PROMPT, args)
    failures = [w for w in caught if "CUDA graph capture failed" in str(w.message)]
    assert len(failures) == 1 and "\n" not in str(failures[0].message)
    assert got["text"] == again["text"] == expected["text"] == "".join(pieces)
    assert got["tokens"] == expected["tokens"]

    generation = chat.Generation(model, tiny_tokenizer, PROMPT, GenerateArgs(max_new_tokens=200), None)
    generation.stop()
    result = generation.wait(30)
    assert result["tokens"] <= 2 and result["stopped_by_user"]
    graphdecode.release(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_captured_replay_equals_the_uncaptured_loop():
    model = lora_model().cuda()
    with torch.inference_mode():
        with lean_lora(model):
            expected = loop_tokens(model)
            graphdecode.release(model)
            got = loop_tokens(model, capture=True)
            step = graphdecode.step_graph(model, 40, compiled=False, capture=True)
            assert step._graph is not None
            adapter_key = step.key
        with model.disable_adapter(), lean_lora(model):  # the order chat uses: adapter state, then lean
            base = loop_tokens(model, capture=True)
            assert step.key != adapter_key  # captured again for the base
        with lean_lora(model):
            again = loop_tokens(model, capture=True)
    assert got == again == expected and base != expected
