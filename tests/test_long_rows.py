"""Rows longer than the memory a step has: checkpointing, then offloading, then one line.

A row is never split across micro-batches, so however small the planning budget, the longest row
must fit in what the GPU (or --memory) really has. The plan (speed.plan_batch) turns checkpointing
on where the row would not fit with every activation kept, offloads the checkpointed layer inputs
to pinned host memory (TRL's activation offloading) where it would not fit with checkpointing
either, and under --memory says in one line what would fit. The dry run plans the same. The
GPU test trains through the offloaded path and checks it learns what the plain path learns.
"""

import json
from pathlib import Path

import pandas as pd
import pytest


GIB = 2**30


def seven_b():
    """The tiny model's config at the Qwen2-7B shape (only the shape is read)."""
    from transformers import AutoConfig

    from ipylora.engine.tiny import tiny_model_path

    config = AutoConfig.from_pretrained(str(tiny_model_path()))
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 3584, 18944, 28
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 28, 4, 128
    config.vocab_size = 152064
    return config


def plan(rows: int, *, quantization="4bit", dropout=0.05, cap=None, host=100 * GIB, free=130 * GIB, n=8):
    from ipylora.engine import speed

    resident = int(5.5 * GIB) if quantization else 15 * GIB
    return speed.plan_batch(seven_b(), [rows] * n, free_bytes=free - resident, resident_bytes=resident,
                            trainable_bytes=640 * 2**20, quantization=quantization, dropout=dropout, batch_size=None,
                            memory_cap=cap, host_free_bytes=host)


def test_long_rows_checkpoint_then_offload_then_refuse():
    from ipylora.engine import speed
    from ipylora.engine.errors import ConfigError

    # Short rows on a roomy GPU keep every activation; a 32k-token row does not fit that way in bf16
    # even on 130 GiB, so the layers are checkpointed (before, the plan left them on and the step ran out).
    assert not plan(512, quantization=None).checkpointing
    long_bf16 = plan(32768, quantization=None)
    assert long_bf16.checkpointing and not long_bf16.offload
    # 4-bit is planned in 8.5 GiB, but a long row may use what the GPU has: checkpointing, no offloading.
    for rows in (16384, 32768):
        four = plan(rows)
        assert four.checkpointing and not four.offload
    # Under --memory the row must fit the cap: offloaded where only that fits...
    capped = plan(32768, cap=20 * GIB)
    assert capped.checkpointing and capped.offload
    saved = speed.activation_bytes_per_token(seven_b(), 0.05, True) - capped.activation_bytes_per_token
    assert saved == pytest.approx((28 - speed.OFFLOAD_IN_FLIGHT) * 2 * 3584)
    assert 5.5 * GIB + 32768 * capped.activation_bytes_per_token < 20 * GIB
    # ...not where the host has no room for the pinned copies, and a row that fits in no way is one line
    # whose two ways out are both true.
    with pytest.raises(ConfigError, match="with checkpointing, more than --memory 20"):
        plan(32768, cap=20 * GIB, host=8 * GIB)
    with pytest.raises(ConfigError) as refused:
        plan(32768, cap=12 * GIB, dropout=0.0)
    message = str(refused.value)
    assert "\n" not in message and "rows of up to 32,768 tokens need about" in message, message
    memory, max_length = (int(message.split(flag)[1].split()[0]) for flag in ("give --memory ", "--max-length "))
    assert plan(32768, cap=memory * GIB, dropout=0.0).offload
    assert plan(max_length, cap=12 * GIB, dropout=0.0).offload
    with pytest.raises(ConfigError):
        plan(max_length + 2048, cap=12 * GIB, dropout=0.0)


def test_dropout_drawn_again_where_only_that_fits(fresh_session, concepts):
    """Kept dropout copies make a 32k row too big for --memory 15 with offloading (with q/k/v's and
    gate/up's copies shared, lora_forward.STACK, it fits 16); without them it fits:
    the plan draws the dropout again (fast_settings on the real adapter model, and the dry run's rule)."""
    from ipylora.engine import DataArgs, LoraArgs, TrainArgs, dropout, speed
    from ipylora.engine.errors import ConfigError

    with pytest.raises(ConfigError):
        plan(32768, cap=15 * GIB)
    deferred = plan(32768, cap=15 * GIB, dropout=0.0)
    assert deferred.offload and speed.defers_dropout(None, deferred)
    session = fresh_session
    session.add_dataset("concepts", concepts, DataArgs(prompt="{concept}", response="{description}"))
    session.train("concepts", TrainArgs(steps=1, lora=LoraArgs(dropout=0.1)))
    model = session.model
    notes = []
    batch, error = speed.kept_plan(lambda p: plan(32768, cap=15 * GIB, dropout=p), 0.05)
    assert batch is None and isinstance(error, ConfigError)
    assert speed._plan_dropout(model, batch, deferred, None, notes, error) is deferred
    assert "the longest rows fit only so" in notes[-1]
    assert dropout.sync(model, enabled=False)[0] == 0
    # Forced to keep the copies (a benchmark's --defer-dropout off), the row's own error is what is raised.
    with pytest.raises(ConfigError, match="rows of up to 32,768"):
        speed._plan_dropout(model, None, deferred, False, notes, error)


def long_rows(words: int, rows: int = 12) -> pd.DataFrame:
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * (words // 9))
    return pd.DataFrame({"prompt": [f"row {i}: summarise" for i in range(rows)], "response": [text] * rows})


def test_offloading_is_planned_by_the_dry_run_and_the_run_alike(fresh_session, monkeypatch):
    """The tiny model has 2 layers, fewer than offloading keeps in flight: with one in flight, rows of
    ~1,800 tokens and a GPU whose free memory holds them only offloaded, the dry run and the real
    run's planner both offload and the run's config asks TRL for it."""
    from ipylora.engine import DataArgs, LoraArgs, TrainArgs, speed
    from ipylora.engine.estimate import estimate
    from ipylora.engine.models import Precision

    monkeypatch.setattr(speed, "OFFLOAD_IN_FLIGHT", 1)
    session = fresh_session
    dataset = session.add_dataset("long", long_rows(750), DataArgs(prompt="{prompt}", response="{response}"))
    session.train("long", TrainArgs(steps=1, max_length=2048))
    lengths = [len(ids) for ids in dataset.tokenize(session.tokenizer, 2048)["input_ids"]]
    longest = max(lengths)
    assert longest > 1500
    config = session.model.get_base_model().config
    kept = speed.activation_bytes_per_token(config, 0.0, True)
    offloaded = speed.activation_bytes_per_token(config, 0.0, True, offload=True)
    assert offloaded < kept
    probe = estimate(TrainArgs(max_length=2048, lora=LoraArgs(dropout=0.0)), dataset, device="cuda", gpu_free_bytes=8 * GIB,
                     session=session)
    fixed = speed.fixed_training_bytes(probe.optimizer_bytes, None)
    room = fixed + longest * (kept + offloaded) / 2  # what the step may use: the row fits only offloaded
    free = int(room / 0.88) + probe.weights_bytes + 4 * probe.shape.lora + 1
    est = estimate(TrainArgs(max_length=2048, lora=LoraArgs(dropout=0.0)), dataset, device="cuda", gpu_free_bytes=free,
                   session=session)
    assert est.checkpointing and est.offload
    assert ("checkpointing", "yes, layer inputs offloaded to host memory") in est.table()
    assert any("offloaded to pinned host memory" in note for note in est.notes)
    fast = speed.fast_settings(session.model, session.tokenizer, lengths, Precision("float32", False, False), "cpu",
                               force=True, memory_budget=int(0.88 * (free - est.weights_bytes - 4 * est.shape.lora)),
                               dropout=0.0, liger=False, batch_size=est.batch_size)
    chosen = fast["_plan"]
    assert chosen.offload and fast["activation_offloading"] is True and fast["gradient_checkpointing"]
    assert (est.step_tokens, est.batch_size, est.accumulation) == \
        (chosen.step_tokens, chosen.batch_size, chosen.accumulation)
    # A roomier GPU keeps the inputs on it: no offloading asked of TRL.
    roomy = speed.fast_settings(session.model, session.tokenizer, lengths, Precision("float32", False, False), "cpu",
                                force=True, memory_budget=8 * GIB, dropout=0.0, liger=False)
    assert not roomy["_plan"].offload and roomy["activation_offloading"] is None


def test_hooks_added_during_a_run_are_taken_off():
    """TRL's offloading hooks the LM head each time a trainer is built and keeps no handle; the run
    takes off what was added during it and leaves the hooks that were there before."""
    import torch

    from ipylora.engine.train import _ModuleHooks

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    seen = []
    model[1].register_forward_hook(lambda *a: seen.append("ours"))
    hooks = _ModuleHooks(model)
    model[1].register_forward_pre_hook(lambda *a: seen.append("pre"))
    model[1].register_forward_hook(lambda *a: seen.append("added"), always_call=True)
    model[0].register_forward_hook(lambda *a: seen.append("first"))
    model(torch.zeros(1, 4))
    assert sorted(seen) == ["added", "first", "ours", "pre"]
    hooks.remove_added()
    seen.clear()
    model(torch.zeros(1, 4))
    assert seen == ["ours"]
    assert not model[1]._forward_hooks_always_called


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="activation offloading needs a GPU")
def test_offloaded_run_learns_what_the_plain_run_learns(fresh_session, monkeypatch):
    """On a GPU: the same 6 steps with the layer inputs kept and offloaded give the same losses
    (offloading moves tensors, it computes nothing), the plan says so in run.json, and the
    resident model has no more hooks after the run than before."""
    from dataclasses import replace

    from ipylora.engine import DataArgs, LoraArgs, TrainArgs, speed

    monkeypatch.setattr(speed, "OFFLOAD_IN_FLIGHT", 1)
    session = fresh_session
    session.add_dataset("long", long_rows(750), DataArgs(prompt="{prompt}", response="{response}"))
    args = TrainArgs(steps=6, max_length=2048, lora=LoraArgs(dropout=0.0), batch_size=2, name="kept")
    kept = session.train("long", args)
    base = session.model.get_base_model()
    head_hooks = (len(base.lm_head._forward_pre_hooks), len(base.lm_head._forward_hooks))
    real = speed.plan_batch

    def tight(config, lengths, **kwargs):  # the GPU has room for these rows only offloaded
        per_token = (speed.activation_bytes_per_token(config, 0.0, True)
                     + speed.activation_bytes_per_token(config, 0.0, True, offload=True)) / 2
        fixed = speed.fixed_training_bytes(kwargs["trainable_bytes"], None)
        return real(config, lengths, **{**kwargs, "memory_budget": int(fixed + max(lengths) * per_token)})

    monkeypatch.setattr(speed, "plan_batch", tight)
    offloaded = session.train("long", replace(args, name="offloaded"))
    losses = []
    for end in (kept, offloaded):
        run = Path("runs") / end.name
        losses.append([json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                       if json.loads(line)["event"] == "StepEnd"])
        assert end.status == "finished"
    plans = [json.loads((Path("runs") / end.name / "run.json").read_text())["speed_plan"] for end in (kept, offloaded)]
    assert plans[1]["offload"] and plans[1]["checkpointing"] and not plans[0]["offload"]
    assert losses[1] == pytest.approx(losses[0], rel=5e-3)  # bf16, flash backward: not bit-equal
    assert (len(base.lm_head._forward_pre_hooks), len(base.lm_head._forward_hooks)) == head_hooks


def test_offload_flag_reaches_the_plan():
    """`%lora_train ... --offload` asks for offloading whatever the rows; without it the plan decides."""
    from ipylora.engine import speed
    from ipylora.magics.args import parse
    from ipylora.magics.train import TrainMagics, train_args

    assert train_args(parse(TrainMagics.lora_train, "long --offload")).offload is True
    assert train_args(parse(TrainMagics.lora_train, "long")).offload is None
    forced = speed.plan_batch(seven_b(), [512] * 64, free_bytes=120 * GIB, resident_bytes=15 * GIB,
                              trainable_bytes=640 * 2**20, quantization=None, dropout=0.0, batch_size=None, offload=True)
    assert forced.checkpointing and forced.offload
