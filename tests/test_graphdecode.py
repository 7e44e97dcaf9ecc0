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
    return graphdecode.decode(model, PROMPT, kw.pop("max_new_tokens", 24), next_token, kw.pop("stops", ()),
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
        assert loop_tokens(model, stops=[eos]) == full[:full.index(eos) + 1]
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


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3", "opt"])
def test_sliding_window_and_opt_answers_equal_generate(family, tmp_path_factory):
    """The step's cache has only full layers (a sliding layer cannot be captured) and one all-ones
    mask over it (OPT's own would read the cache length back to the host); the model's sliding-window
    mask still applies: 20 prompt tokens and 24 new ones span more than the 16-token window, and
    the answer with the window taken away differs."""
    import model_matrix
    from transformers import AutoModelForCausalLM

    path = model_matrix.build(model_matrix.BY_NAME[family], tmp_path_factory.mktemp("matrix"))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = list(range(40, 60))
    with torch.inference_mode():
        output = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        got = graphdecode.decode(model, prompt, 24, graphdecode.picker(model, 0.0, 1.0), (), capture=False)
        assert not any(graphdecode.step_graph(model, 44, compiled=False, capture=False).cache.is_sliding)
        graphdecode.release(model)
        assert got == output[0, len(prompt):].tolist()
        if getattr(model.config, "sliding_window", None):
            for module in (model.config, *model.modules()):
                if getattr(module, "sliding_window", None):
                    module.sliding_window = 10_000
            assert graphdecode.decode(model, prompt, 24, graphdecode.picker(model, 0.0, 1.0), (),
                                      capture=False) != got
            graphdecode.release(model)


class FakeCuda:
    """Stand-ins for torch.cuda's streams and graphs on CPU, to drive the capture logic end to end.
    A "capture" runs the step (a real one only records it; the prefill's cache reset makes that
    harmless) and remembers its output; `replay` runs the step again in the LoRA form it was
    captured in and writes that output, as a real replay writes its output buffer."""

    def __init__(self, monkeypatch):
        from contextlib import contextmanager, nullcontext

        from ipylora.engine import decode

        self.captures = []  # per capture: whether LoRA ran as the compiled kernels
        self.open = None
        fake = self

        class Stream:
            def __init__(self, *args):
                pass

            def wait_stream(self, other):
                pass

        class Graph:
            def replay(self):
                with decode.capturing(self.kernels):
                    self.output.copy_(self.step())

        @contextmanager
        def graph(g, capture_error_mode=None):
            g.kernels = decode._capture.kernels
            fake.captures.append(g.kernels)
            fake.open = g
            yield

        for name, value in dict(Stream=Stream, current_stream=lambda *a: Stream(), stream=lambda s: nullcontext(),
                                CUDAGraph=Graph, graph=graph).items():
            monkeypatch.setattr(torch.cuda, name, value)
        record = graphdecode.StepGraph._record

        def recording(step_graph, key, kernels):
            inner = step_graph._step

            def step():
                output = inner()
                if fake.open is not None:  # the call inside the capture
                    fake.open.step, fake.open.output, fake.open = inner, output, None
                return output

            step_graph._step = step
            try:
                record(step_graph, key, kernels)
            finally:
                step_graph._step = inner

        monkeypatch.setattr(graphdecode.StepGraph, "_record", recording)


def test_capture_logic_on_cpu_with_stand_ins(monkeypatch):
    """Capture, replay in the captured LoRA form (compiled kernels, shared A products), re-capture on
    another adapter state, and the fall-backs: kernels fail -> plain products; torch.compile fails ->
    the uncompiled step; capture fails -> none."""
    from ipylora.engine import decode, gemv

    # The one-token Triton kernels would run in the interpreter here, slowly: tests/test_gemv.py
    # checks them in this captured form; this test is about capturing.
    monkeypatch.setattr(gemv, "available", lambda: False)
    model = lora_model()
    with torch.inference_mode(), lean_lora(model):
        expected = loop_tokens(model)
    graphdecode.release(model)
    fake = FakeCuda(monkeypatch)
    with torch.inference_mode():
        with lean_lora(model):
            assert loop_tokens(model, capture=True) == expected
            assert loop_tokens(model, capture=True) == expected
        assert fake.captures == [True]  # captured once, with the compiled LoRA kernels
        with model.disable_adapter(), lean_lora(model):
            base = loop_tokens(model, capture=True)
        assert fake.captures == [True, True] and base != expected
        graphdecode.release(model)

        broken = lambda *args: (_ for _ in ()).throw(RuntimeError("no triton"))  # noqa: E731
        monkeypatch.setattr(decode, "_capture_kernels", lambda: (broken, broken))
        with lean_lora(model), warnings.catch_warnings():
            warnings.simplefilter("error")  # the plain-product capture needs no warning
            assert loop_tokens(model, capture=True) == expected
        assert fake.captures[2:] == [False]
        graphdecode.release(model)

        monkeypatch.setattr(torch, "compile", lambda fn, **options: broken)
        with lean_lora(model), pytest.warns(RuntimeWarning, match="torch.compile failed .*uncompiled step"):
            assert loop_tokens(model, capture=True, compiled=True) == expected
        assert fake.captures[3:] == [False]  # captured all the same, uncompiled
        graphdecode.release(model)

        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: (_ for _ in ()).throw(RuntimeError("no graphs")))
        with lean_lora(model), pytest.warns(RuntimeWarning, match="CUDA graph capture failed .*no graphs"):
            assert loop_tokens(model, capture=True) == expected
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3", "opt", "falcon"])
def test_matrix_families_capture_and_replay_the_uncaptured_answer(family, tmp_path_factory):
    """Sliding-window caches, OPT (which built its mask from the cache length) and Falcon capture,
    and the replay answers as the uncaptured loop does."""
    import model_matrix
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = model_matrix.build(model_matrix.BY_NAME[family], tmp_path_factory.mktemp("matrix"))
    base = AutoModelForCausalLM.from_pretrained(path).cuda().eval()
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    prompt = list(range(40, 60))
    with torch.inference_mode(), lean_lora(model), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = graphdecode.decode(model, prompt, 24, graphdecode.picker(model, 0.0, 1.0), (), capture=False)
        graphdecode.release(model)
        got = graphdecode.decode(model, prompt, 24, graphdecode.picker(model, 0.0, 1.0), ())
        captured = graphdecode.step_graph(model, 44, compiled=False)._graph is not None
    graphdecode.release(model)
    assert captured, [str(w.message) for w in caught]
    assert got == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_a_failed_capture_leaves_random_ops_working(monkeypatch):
    """A step that reads a value back to the host cannot be captured: chat warns and decodes
    uncaptured, and dropout afterwards (the next training run) still works."""
    model = lora_model().cuda()
    with torch.inference_mode(), lean_lora(model):
        expected = loop_tokens(model)
    graphdecode.release(model)
    forward = graphdecode.StepGraph._forward
    monkeypatch.setattr(graphdecode.StepGraph, "_forward", lambda self: forward(self) + 0 * self.position.sum().item())
    with torch.inference_mode(), lean_lora(model), \
            pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        assert loop_tokens(model, capture=True) == expected
    graphdecode.release(model)
    dropped = torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5, training=True)
    assert 0 < int((dropped == 0).sum()) < 64


def batch_prompts() -> list[list[int]]:
    """Prompts of different lengths (left padding matters), one of them long enough to be cut."""
    ids = torch.randint(5, 1000, (5, 16), generator=torch.Generator().manual_seed(11)).tolist()
    return [ids[0][:3], ids[1], ids[2][:9], ids[3][:1], ids[4][:12]]


def hf_batch(model, prompts, pad, stops, max_new_tokens=20) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    output = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=list(stops) or None, pad_token_id=pad)
    rows = output[:, width:].tolist()
    return [row[:next((i + 1 for i, t in enumerate(row) if t in stops), len(row))] for row in rows]


def test_a_left_padded_batch_decodes_as_generate_does(model):
    """decode_batch: every row gets the greedy tokens generate() gives it in a left-padded batch, a row
    that reaches a stop token ends there (the others go on), and the rows past the prompts given
    (a graph of more rows) are left out."""
    prompts = batch_prompts()
    pad = 0
    with torch.inference_mode(), lean_lora(model):
        free = hf_batch(model, prompts, pad, ())
        stops = (free[2][5],)  # a token row 3 reaches early: that row stops there
        expected = hf_batch(model, prompts, pad, stops)
        got = graphdecode.decode_batch(model, prompts, pad, 20, graphdecode.picker(model, 0.0, 1.0), stops,
                                       capture=False)
        graph = graphdecode.step_graph(model, 40, compiled=False, capture=False, batch=len(prompts))
        again = graphdecode.decode_batch(model, prompts[:3], pad, 20, graphdecode.picker(model, 0.0, 1.0), stops,
                                         capture=False)
        assert graphdecode.step_graph(model, 40, compiled=False, capture=False, batch=3) is graph  # rows padded
    graphdecode.release(model)
    assert len(expected[2]) <= 6 and any(len(row) == 20 for row in expected)
    assert got == expected
    assert again == hf_batch(model, prompts[:3], pad, stops)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_a_captured_batch_step_replays_the_uncaptured_batch(compiled):
    """Captured, with its layers compiled (decode_layers.py) or not, the batch step answers as the
    uncaptured eager one does."""
    model = lora_model().cuda()
    prompts = batch_prompts()
    with torch.inference_mode(), lean_lora(model):
        expected = graphdecode.decode_batch(model, prompts, 0, 20, graphdecode.picker(model, 0.0, 1.0), (),
                                            capture=False)
        graphdecode.release(model)
        with warnings.catch_warnings():
            # a compile or capture that fails would warn and go on without (inductor's own advice, such as
            # its TF32 note for this fp32 model, is not a failure)
            warnings.filterwarnings("error", message=".*failed for this model")
            got = graphdecode.decode_batch(model, prompts, 0, 20, graphdecode.picker(model, 0.0, 1.0), (),
                                           compiled=compiled)
        assert graphdecode.step_graph(model, 40, compiled=compiled, batch=len(prompts))._graph is not None
    graphdecode.release(model)
    assert got == expected


def test_generate_batch_merges_the_adapter_into_copies_and_answers_as_unmerged(monkeypatch, tiny_tokenizer):
    """generate_batch decodes with the adapter merged into copies of the weights (on the GPU, memory
    allowing): the same answers as the unmerged step; the copies and the step captured on them are
    kept for the next call, and freed with the steps. On CPU the batched path is forced (its capture
    fails there, with a warning)."""
    from ipylora.engine import decode
    from ipylora.engine.models import base_of

    model = lora_model().cuda() if torch.cuda.is_available() else lora_model()
    budget = chat._merge_budget if torch.cuda.is_available() else (lambda model: 1 << 40)
    if not torch.cuda.is_available():
        monkeypatch.setattr(graphdecode, "usable", lambda model: True)
        monkeypatch.setattr(graphdecode, "BATCH_ROWS", 4)  # two batches through one graph
        warnings.simplefilter("ignore")
    prompts = batch_prompts()
    args = GenerateArgs(max_new_tokens=20)
    merged_bytes = []
    merging = decode.merged_forwards

    def recording(model, budget):
        patches, used = merging(model, budget)
        merged_bytes.append(used)
        return patches, used

    monkeypatch.setattr(decode, "merged_forwards", recording)
    monkeypatch.setattr(chat, "_merge_budget", lambda model: 0)
    expected = chat.generate_batch(model, tiny_tokenizer, prompts, args)
    graphdecode.release(model)
    monkeypatch.setattr(chat, "_merge_budget", budget)
    got = chat.generate_batch(model, tiny_tokenizer, prompts, args)
    again = chat.generate_batch(model, tiny_tokenizer, prompts, args)
    assert merged_bytes[0] == 0 and merged_bytes[1] > 0 and len(merged_bytes) == 2  # kept for the second call
    assert [r["text"] for r in got] == [r["text"] for r in again] == [r["text"] for r in expected]
    base = base_of(model)
    assert base.__dict__.get(graphdecode._BATCH_SLOT) is not None and base.__dict__[graphdecode._COPIES][1]
    graphdecode.release(model)
    assert graphdecode._COPIES not in base.__dict__ and graphdecode._BATCH_SLOT not in base.__dict__


def test_one_token_grouped_query_attention_folded_equals_transformers_sdpa():
    """folded_gqa: a decode step's query heads folded onto their key/value heads give what
    transformers' SDPA gives with its repeated heads, padding mask and all; a prefill (several query
    tokens) goes to transformers' own function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(5)
    query, key, value = (torch.randn(3, heads, length, 16, generator=g) for heads, length in ((8, 1), (2, 10), (2, 10)))
    mask = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., :4] = False  # a left-padded row
    mask[2, ..., 7:] = False  # slots past this row's position
    module = torch.nn.Module().eval()
    module.num_key_value_groups, module.is_causal = 4, True
    folded = graphdecode._folding(sdpa_attention_forward)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    got, _ = folded(module, query, key, value, mask, scaling=0.3)
    assert got.shape == expected.shape == (3, 1, 8, 16)
    assert torch.allclose(got, expected, atol=1e-6)
    prefill = torch.randn(3, 8, 10, 16, generator=g)
    wide = torch.ones(3, 1, 10, 10, dtype=torch.bool).tril()
    assert torch.equal(folded(module, prefill, key, value, wide)[0], sdpa_attention_forward(module, prefill, key, value, wide)[0])


def gqa_lora_model(layers: int, vocab: int = 1024):
    """A random Qwen2 with 2 query heads per key/value head and an r8 adapter (B random) on every linear layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        pad_token_id=0))
    return get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)).eval()


def test_a_grouped_query_model_decodes_a_batch_as_generate_does():
    """End to end on a model with 2 query heads per key/value head, where folded_gqa is taken."""
    model = gqa_lora_model(layers=2)
    prompts = batch_prompts()
    calls = []
    folding = graphdecode._folding

    def counting(original):
        inner = folding(original)

        def attention(module, query, *args, **kwargs):
            calls.append(query.shape[2])
            return inner(module, query, *args, **kwargs)
        return attention

    with torch.inference_mode(), lean_lora(model), pytest.MonkeyPatch.context() as patch:
        patch.setattr(graphdecode, "_folding", counting)
        expected = hf_batch(model, prompts, 0, ())
        got = graphdecode.decode_batch(model, prompts, 0, 20, graphdecode.picker(model, 0.0, 1.0), (), capture=False)
    graphdecode.release(model)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward  # put back after decoding
    assert calls.count(1) >= 19 * 2  # every decode step of both layers went through the fold
    assert got == expected


@pytest.mark.parametrize("family", ["lora", "mistral", "gemma3", "gemma2"])
def test_a_packed_prefill_fills_the_cache_the_padded_one_does(family, tmp_path_factory):
    """prefill_batch runs the rows as one packed row where training packs them (the tiny LoRA Llama,
    Mistral's and Gemma 3's sliding windows, which prompts of 30 tokens exceed); Gemma 2 soft-caps
    its attention, so its rows stay padded. Packed or not: the same logits, the same keys and
    values in the slots the left-padded batch fills, and the greedy tokens generate() gives."""
    import model_matrix
    from transformers import AutoModelForCausalLM

    if family == "lora":
        model = lora_model()
    else:
        path = model_matrix.build(model_matrix.BY_NAME[family], tmp_path_factory.mktemp("matrix"))
        model = AutoModelForCausalLM.from_pretrained(path).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (30, 7, 19, 1, 24)]
    packed_calls = []
    packing = graphdecode.StepGraph._prefill_packed

    def counted(graph, rows, width):
        packed_calls.append(len(rows))
        return packing(graph, rows, width)

    with torch.inference_mode(), lean_lora(model), pytest.MonkeyPatch.context() as patch:
        patch.setattr(graphdecode.StepGraph, "_prefill_packed", counted)
        fills = []
        for packed in (False, True):
            graph = graphdecode.StepGraph(model, 64, capture=False, batch=len(prompts))
            graph._packed_prefill = packed and graph._packed_prefill
            logits, width = graph.prefill_batch(prompts, 0)
            fills.append((logits, graph.cache, graph.mask.clone()))
        expected = hf_batch(model, prompts, 0, ())
        got = graphdecode.decode_batch(model, prompts, 0, 20, graphdecode.picker(model, 0.0, 1.0), (), capture=False)
    graphdecode.release(model)
    assert packed_calls == ([] if family == "gemma2" else [len(prompts)] * 2)
    (padded_logits, padded, mask), (packed_logits, packed, _) = fills
    assert torch.allclose(packed_logits, padded_logits, atol=1e-4)
    real = mask[:, :width].bool()  # the slots of real tokens (the padding's are masked)
    for a, b in zip(padded.layers, packed.layers):
        assert int(a.cumulative_length) == int(b.cumulative_length) == width
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            assert torch.allclose(x[:, :, :width].transpose(1, 2)[real], y[:, :, :width].transpose(1, 2)[real], atol=1e-4)
    assert got == expected


def test_a_decode_step_writes_the_cache_at_its_position_and_nothing_more():
    """The step's cache layers (graphdecode.slot_layer) write the token's key and value at the step's
    position tensor: two copies a layer, where transformers' StaticLayer also builds the slot from its
    counter (an arange and an add) and moves the counter on; only the first layer, the one
    get_seq_length reads, still counts. The decode loop's answers are checked against generate() above."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    model = lora_model()
    with torch.inference_mode():
        graph = graphdecode.StepGraph(model, 32, capture=False)
        logits = graph.prefill(PROMPT[:5])
        first, second = graph.cache.layers[:2]
        assert int(first.cumulative_length) == int(second.cumulative_length) == 5
        key = torch.randn(1, first.keys.shape[1], 1, first.keys.shape[3])
        value = key + 1
        graph.position.fill_(5)
        for layer, expected in ((first, ["index_copy_", "index_copy_", "add_"]), (second, ["index_copy_", "index_copy_"])):
            with Ops() as ops:
                layer.update(key, value)
            assert [name.split(".")[0] for name in ops.names] == expected
            assert torch.equal(layer.keys[:, :, 5:6], key) and torch.equal(layer.values[:, :, 5:6], value)
        assert graph.cache.get_seq_length() == 6 and logits.shape[-1] == model.config.vocab_size


def test_chat_decodes_on_merged_copies_kept_across_turns(monkeypatch, tiny_tokenizer):
    """Chat's step runs on the adapter merged into copies of the weights (memory allowing): the
    answers unmerged generate() gives, the copies made once for two turns and kept with the model,
    made again when the adapter's weights change, and freed with the steps."""
    from ipylora.engine.models import base_of

    model = lora_model()
    args = GenerateArgs(max_new_tokens=16)
    expected = chat.generate(model, tiny_tokenizer, PROMPT, args)
    monkeypatch.setattr(graphdecode, "usable", lambda m: True)
    monkeypatch.setattr(chat, "_merge_budget", lambda m: 1 << 40)
    from ipylora.engine import decode

    made = []
    merging = decode.merged_forwards

    def counting(model, budget):
        patches, used = merging(model, budget)
        made.append(len(patches))
        return patches, used

    monkeypatch.setattr(decode, "merged_forwards", counting)
    warnings.simplefilter("ignore")  # the capture fails on CPU, with a warning
    first = chat.generate(model, tiny_tokenizer, PROMPT, args)
    second = chat.generate(model, tiny_tokenizer, PROMPT, args)
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert made == [len(layers)] and first["text"] == second["text"] == expected["text"]
    assert not any("forward" in m.__dict__ for m in layers)  # the copies' forwards are in place only while decoding
    assert len(base_of(model).__dict__[graphdecode._COPIES][1]) == len(layers)
    from ipylora.engine.session import _memory_text

    assert graphdecode.copies_bytes(model) == sum(m.base_layer.weight.numel() * 4 for m in layers)
    assert "merged into copies for decoding" in _memory_text(model)  # %lora_status says where the memory is
    with torch.no_grad():
        layers[0].lora_B["default"].weight.mul_(-3.0)  # new weights: the copies are stale
    monkeypatch.setattr(graphdecode, "usable", lambda m: False)
    changed = chat.generate(model, tiny_tokenizer, PROMPT, args)
    monkeypatch.setattr(graphdecode, "usable", lambda m: True)
    third = chat.generate(model, tiny_tokenizer, PROMPT, args)
    assert changed["text"] != first["text"]  # stale copies would have answered as before
    assert made == [len(layers)] * 2 and third["text"] == changed["text"]
    graphdecode.release(model)
    assert not {graphdecode._COPIES, graphdecode._SLOT} & set(base_of(model).__dict__)
    assert graphdecode.copies_bytes(model) == 0


def test_compiled_decode_layers_answer_as_the_eager_step_with_one_compilation_for_all_layers():
    """decode_layers.compiled_layers (`compiled=True`): a 4-layer grouped-query model with an adapter
    decodes a batch and one prompt to generate()'s greedy tokens with its layers compiled, and one
    compilation serves the 4 layers (the length counter is kept outside it). A Liger-style
    instance forward is set aside while compiled and put back after; so are the layers' own forwards."""
    import types

    from torch._dynamo.utils import counters

    model = gqa_lora_model(layers=4)
    base = model.get_base_model()
    prompts = batch_prompts()

    lengths = []

    def fused(self, hidden_states):  # stands in for a Liger kernel bound to the instance
        lengths.append(hidden_states.shape[1])
        return type(self).forward(self, hidden_states)
    fused.__module__ = "liger_kernel.ops.fake"
    norm = base.model.layers[1].post_attention_layernorm
    torch._dynamo.reset()
    counters.clear()
    with torch.inference_mode(), lean_lora(model):
        expected = hf_batch(model, prompts, 0, ())
        one = hf_tokens(model, do_sample=False)
        norm.forward = types.MethodType(fused, norm)
        counters_after = []
        for compiled in (False, True):  # the length counter a next turn reads, eager and compiled
            graphdecode.release(model)
            lengths.clear()
            got = graphdecode.decode_batch(model, prompts, 0, 20, graphdecode.picker(model, 0.0, 1.0), (),
                                           compiled=compiled, capture=False)
            cache = base.__dict__[graphdecode._BATCH_SLOT].cache
            counters_after.append(int(cache.layers[0].cumulative_length))
        flags = [layer.counts for layer in cache.layers]
        graphs = counters["stats"]["unique_graphs"]
        alone = loop_tokens(model, compiled=True)
    graphdecode.release(model)
    assert got == expected and alone == one
    assert graphs == 1
    assert lengths and 1 not in lengths  # the prefills ran it, the compiled one-token steps did not
    assert counters_after[0] == counters_after[1] and flags == [True, False, False, False]
    assert norm.__dict__["forward"].__func__ is fused
    assert all("forward" not in layer.__dict__ for layer in base.model.layers)


@pytest.mark.parametrize("family", ["gemma3", "qwen3-moe"])
def test_compiled_decode_layers_on_matrix_families(family, tmp_path_factory):
    """Gemma 3 (sliding window, soft-capping, q/k norms) decodes with its layers compiled to the eager
    step's tokens; Qwen3-MoE's expert loop breaks the layer's graph, so the step says so once and
    decodes uncompiled, with the same tokens."""
    import model_matrix
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    path = model_matrix.build(model_matrix.BY_NAME[family], tmp_path_factory.mktemp("matrix"))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path).eval(),
                           LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    prompt = list(range(40, 60))
    torch._dynamo.reset()
    counters.clear()
    with torch.inference_mode(), lean_lora(model), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = graphdecode.decode(model, prompt, 8, graphdecode.picker(model, 0.0, 1.0), (), capture=False)
        graphdecode.release(model)
        got = graphdecode.decode(model, prompt, 8, graphdecode.picker(model, 0.0, 1.0), (), compiled=True,
                                 capture=False)
    graphdecode.release(model)
    said = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    assert got == expected
    if family == "qwen3-moe":
        assert len(said) == 1 and "uncompiled step" in said[0]
    else:
        assert not said and counters["stats"]["unique_graphs"] == 1
