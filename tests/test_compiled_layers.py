"""Compiled decoder layers for training (ipylora.engine.compiled_layers): eager's loss and gradients on
packed batches of changing shapes, one graph for all layers past the first, eager again after."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from ipylora.engine import compiled_layers, lora_forward, speed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def packed(lengths: list[int], seed: int = 0) -> dict:
    """One packed row of `lengths` sequences, with the boundaries TRL's padding-free collator passes."""
    ids = torch.randint(3, 200, (1, sum(lengths)), generator=torch.Generator().manual_seed(seed))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return dict(input_ids=ids, labels=ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                max_length_q=max(lengths), max_length_k=max(lengths))


def loss_and_grads(model, batch: dict):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def pair():
    """(eager model, compiled copy): the tiny model with varlen attention and the lean LoRA forward, as
    fast_settings leaves it, an adapter on every linear layer with B not zero."""
    from transformers import AutoModelForCausalLM

    from ipylora.engine.tiny import tiny_model_path

    torch._dynamo.reset()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32)
    speed.set_attention(base, "varlen")
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    eager = get_peft_model(base, config).train()
    lora_forward.sync(eager)
    compiled = copy.deepcopy(eager)
    assert compiled_layers.compile_layers(compiled) == 2 and compiled_layers.compiled(compiled)
    assert not compiled_layers.compiled(eager)
    return eager, compiled


def test_eager_s_loss_and_gradients_on_changing_shapes_with_two_graphs(pair):
    from torch._dynamo.utils import counters

    eager, compiled = pair
    before, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())  # earlier tests'
    for i, lengths in enumerate(([5, 9, 3], [7, 12], [4, 4, 4, 6])):
        batch = packed(lengths, seed=i)
        (loss, grads), (loss2, grads2) = loss_and_grads(eager, batch), loss_and_grads(compiled, batch)
        assert abs(loss - loss2) < 1e-5 * abs(loss)
        assert grads.keys() == grads2.keys() and len(grads) == 28
        for name in grads:
            assert torch.allclose(grads[name], grads2[name], atol=1e-5, rtol=1e-4), name
        # the first layer's graph (its input needs no gradient) and the other layers'; new token
        # counts and sequence counts compile nothing more; nothing runs outside a graph
        assert counters["stats"]["unique_graphs"] == before + 2, lengths
        assert sum(counters["graph_break"].values()) == breaks


def test_restore_gives_the_eager_forward_and_compiling_again_reuses_the_code(pair):
    from torch._dynamo.utils import counters

    _, compiled = pair
    with compiled_layers.eager(compiled):  # samples mid-run
        assert all(layer._compiled_call_impl is None for layer in compiled_layers.decoder_layers(compiled))
    assert all(layer._compiled_call_impl is not None for layer in compiled_layers.decoder_layers(compiled))
    compiled_layers.restore(compiled)
    assert not compiled_layers.compiled(compiled)
    assert all(layer._compiled_call_impl is None for layer in compiled_layers.decoder_layers(compiled))
    graphs = counters["stats"]["unique_graphs"]
    compiled_layers.compile_layers(compiled)
    loss_and_grads(compiled, packed([6, 10], seed=7))
    assert counters["stats"]["unique_graphs"] == graphs  # a second run on the resident model compiles nothing
    compiled_layers.restore(compiled)


def test_padding_to_buckets_changes_no_loss_or_gradient_and_gives_the_layers_few_shapes(pair):
    """What CUDA-graphed layers need (pad_to_buckets): token counts in multiples of the bucket, a
    fixed number of boundaries and one longest length, while the loss and every gradient stay
    eager's unpadded ones (the padding is a sequence of its own, cut off before the LM head)."""
    eager, _ = pair
    padded = copy.deepcopy(eager)
    assert compiled_layers.pad_to_buckets(padded, bucket=16, sequences=6, longest=12)
    seen = []
    first = compiled_layers.decoder_layers(padded)[0]
    hook = first.register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0].shape[1] if a else k["hidden_states"].shape[1], k["cu_seq_lens_q"].tolist(),
                                     k["max_length_q"])), with_kwargs=True)
    for i, lengths in enumerate(([5, 9, 3], [7, 12], [4, 4, 4, 6], [16])):
        batch = packed(lengths, seed=i)
        (loss, grads), (loss2, grads2) = loss_and_grads(eager, batch), loss_and_grads(padded, batch)
        assert abs(loss - loss2) < 1e-5 * abs(loss), lengths
        for name in grads:
            assert torch.allclose(grads[name], grads2[name], atol=1e-6, rtol=1e-5), name
    hook.remove()
    # 32 is this model's head_dim, a count the compiler would specialise on: 48 instead
    assert [tokens for tokens, _, _ in seen] == [48, 48, 48, 16]
    assert all(len(cu) == 7 and cu[-1] == tokens for tokens, cu, _ in seen)
    assert seen[0][1] == [0, 5, 14, 17, 33, 48, 48] and seen[3][1] == [0, 16, 16, 16, 16, 16, 16]
    assert {most for _, _, most in seen} == {16}
    with torch.no_grad():  # eval and generation forwards are left as they are
        assert padded.eval()(input_ids=torch.tensor([[5, 6, 7]])).logits.shape[1] == 3
    padded.train()
    compiled_layers.restore(padded)  # no hooks left
    seen.clear()
    loss_and_grads(padded, packed([5, 9, 3]))
    assert not getattr(compiled_layers._layer_stack(padded), compiled_layers.BUCKETS, None)


def test_graphed_layers_through_fast_settings_keep_eager_s_loss(pair):
    """`layer_graphs=True` (forced here: CUDA graphs themselves need a GPU, where inductor records
    them; on CPU the same compiled code runs without): the plan says so, the layers are compiled in
    "reduce-overhead" mode behind the bucket padding, and the loss is eager's."""
    from ipylora.engine.models import choose_precision

    eager, _ = pair
    model = copy.deepcopy(eager)
    plan = speed.fast_settings(model, None, [40] * 600, choose_precision("cpu", None), "cpu", force=True,
                               attention="varlen", compile_layers=True, layer_graphs=True)["_plan"]
    assert plan.compiled and plan.graphs and compiled_layers.graphed(model)
    assert any("CUDA graphs" in note for note in plan.notes), plan.notes
    for i, lengths in enumerate(([5, 9, 3], [7, 12])):
        batch = packed(lengths, seed=i)
        assert abs(loss_and_grads(eager, batch)[0] - loss_and_grads(model, batch)[0]) < 1e-5
    compiled_layers.restore(model)
    assert not compiled_layers.compiled(model)


def test_bucketed_token_counts_compile_nothing_more(pair):
    """Each bucket is a new shape for the graphed layers, never a new compilation: a count equal to
    one of the model's sizes (32, this model's head_dim) would be compiled as a constant, so it
    takes the next bucket."""
    from torch._dynamo.utils import counters

    _, compiled = pair
    assert compiled_layers.compile_layers(compiled, graphs=True) == 2 and compiled_layers.graphed(compiled)
    assert compiled_layers.pad_to_buckets(compiled, bucket=16, sequences=6, longest=20)
    assert compiled.base_model.model.config.head_dim == 32
    loss_and_grads(compiled, packed([5, 9, 3]))  # 17 tokens: 32 is head_dim, so 48
    graphs = counters["stats"]["unique_graphs"]
    for i, lengths in enumerate(([7, 12], [4, 4, 4, 6, 9, 10], [16], [20, 20, 5], [3, 3])):
        loss_and_grads(compiled, packed(lengths, seed=i))
    assert counters["stats"]["unique_graphs"] == graphs
    compiled_layers.restore(compiled)


def test_bucket_for_pads_about_a_sixteenth():
    assert compiled_layers.bucket_for(500) == 128
    assert compiled_layers.bucket_for(12_500) == 896
    assert compiled_layers.bucket_for(12_500) / 2 / 12_500 < 0.04


@pytest.mark.parametrize("case", ["asked", "default", "deferred dropout", "4-bit", "liger tried, not applied",
                                  "liger applied"])
def test_fast_settings_compiles_only_where_the_graph_stays_whole(case, monkeypatch):
    """Compiled layers replace Liger's kernels; checkpointing, the deferred dropout and 4-bit bases
    (which break the graph) keep the layers eager, with a note."""
    from transformers import AutoModelForCausalLM

    from ipylora.engine.models import choose_precision
    from ipylora.engine.tiny import tiny_model_path

    monkeypatch.setattr(speed, "_narrow_frozen_weights", lambda *a: None)  # no 4-bit weights on this CPU model
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32)
    if case.startswith("liger"):  # what an earlier run on this resident model found (models.base_memo)
        base.__dict__["_ipylora_memo"] = {"liger": (case == "liger applied", [])}
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"))
    plan = speed.fast_settings(model, None, [40] * 600, choose_precision("cpu", None), "cpu", force=True,
                               dropout=0.1, compile_layers=None if case == "default" else True,
                               defer_dropout=case == "deferred dropout",
                               quantization="4bit" if case == "4-bit" else None)["_plan"]
    asked = case in ("asked", "liger tried, not applied") or (case == "default" and compiled_layers.DEFAULT)
    assert plan.compiled == compiled_layers.compiled(model) == asked
    if plan.compiled:
        assert not plan.liger and any("decoder layers compiled" in n for n in plan.notes)
        compiled_layers.restore(model)
    elif case != "default":
        why = {"deferred dropout": "dropout drawn again", "4-bit": "4bit base", "liger applied": "Liger's kernels"}[case]
        assert any("not compiled" in n and why in n for n in plan.notes), plan.notes


def test_the_train_magic_s_compile_flags():
    from IPython.core.error import UsageError

    from ipylora.magics.args import parse
    from ipylora.magics.train import TrainMagics, train_args

    assert [train_args(parse(TrainMagics.lora_train, line)).compile
            for line in ("demo --compile", "demo --no-compile", "demo")] == [True, False, None]
    with pytest.raises(UsageError, match="one of --compile and --no-compile"):
        train_args(parse(TrainMagics.lora_train, "demo --compile --no-compile"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled training layers run on a GPU")
def test_a_compiled_run_learns_what_the_eager_run_learns(fresh_session, concepts):
    """On a GPU, through Session.train: the same steps with eager and compiled layers give the same
    losses (bf16: to rounding), run.json's plan says which, a sample mid-run decodes eagerly, and
    after the run the resident model's layers are eager again."""
    import json
    from dataclasses import replace
    from pathlib import Path

    from support import PROMPT

    from ipylora.engine import DataArgs, LoraArgs, TrainArgs

    session = fresh_session
    session.add_dataset("concepts", concepts, DataArgs(prompt=PROMPT, response="{description}"))
    args = TrainArgs(steps=8, batch_size=8, lora=LoraArgs(dropout=0.0), name="eager", compile=False)
    runs = [session.train("concepts", args),
            session.train("concepts", replace(args, name="compiled", compile=True, samples=("What is LoRA?",),
                                              sample_every=4))]
    losses, plans = [], []
    for end in runs:
        folder = Path("runs") / end.name
        events = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        losses.append([e["loss"] for e in events if e["event"] == "StepEnd"])
        plans.append(json.loads((folder / "run.json").read_text())["speed_plan"])
        assert end.status == "finished"
    assert [p["compiled"] for p in plans] == [False, True]
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    assert any(e["event"] == "Sample" for e in events)
    assert not compiled_layers.compiled(session.model)
