"""A training step reads nothing back from the device (lagged.py), and its logs say what the
Trainer's own would: each step's loss, gradient norm, TRL's metrics and tokens, with its own step.

The runs take the GPU's path on CPU (speed.fast_settings forced: padding-free rows through the
varlen attention). On CPU nothing waits, so the test counts the operators that would make the
host wait on a GPU (`.item()`, `bool(tensor)`, `nonzero`...) in the middle steps of a run.
"""

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ipylora.engine import DataArgs, TrainArgs, lagged, speed
from ipylora.engine.events import Notice, StepEnd

from support import PROMPT

# Operators whose result the host needs at once: on a GPU each waits for everything queued.
WAITS = {"aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten.masked_select",
         "aten._unique2", "aten.unique_consecutive", "aten.repeat_interleave"}
# Not compared: timings, and total_flos (the second run's model also holds the first run's adapter,
# whose parameters the Trainer's FLOP count includes).
TIMED = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_tokens_per_second",
         "total_flos"}


class Waits(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []
        self.on = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        sized = name == "aten.repeat_interleave" and (kwargs or {}).get("output_size") is not None
        if self.on and name in WAITS and not sized:  # told its output size, repeat_interleave need not wait
            import traceback

            where = [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in traceback.extract_stack()[-8:-1]
                     if "_python_dispatch" not in f.filename]
            self.seen.append((str(func.overloadpacket), where[-4:]))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def session(fresh_session, concepts, monkeypatch):
    # The GPU's plan on CPU: padding-free batches, varlen attention, lora_forward's layers.
    monkeypatch.setattr(speed, "fast_settings", functools.partial(speed.fast_settings, force=True, liger=False))
    fresh_session.add_dataset("c", concepts.head(24), DataArgs(prompt=PROMPT, response="{description}"))
    return fresh_session


def _run(session, monkeypatch, name, lag=True, steps=6):
    """Train `steps` steps; the waits of steps 3 and 4 (not the collator's, which works on host
    tensors), every log the Trainer made, and the run's events."""
    from transformers import Trainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    monkeypatch.setattr(lagged.LaggedLogs, "lag", lag)
    waits, logs, calls = Waits(), [], {"n": 0}
    step = Trainer.training_step
    collate = DataCollatorForLanguageModeling.__call__
    log = Trainer.log

    def training_step(self, *args, **kwargs):
        calls["n"] += 1
        waits.on = calls["n"] in (3, 4)
        return step(self, *args, **kwargs)

    def collating(self, *args, **kwargs):
        on, waits.on = waits.on, False
        try:
            return collate(self, *args, **kwargs)
        finally:
            waits.on = on

    def logging(self, entry, start_time=None):
        logs.append({"step": self.state.global_step, "tokens": self.state.num_input_tokens_seen,
                     **{k: v for k, v in entry.items() if k not in TIMED}})
        return log(self, entry, start_time)

    monkeypatch.setattr(Trainer, "training_step", training_step)
    monkeypatch.setattr(DataCollatorForLanguageModeling, "__call__", collating)
    monkeypatch.setattr(Trainer, "log", logging)
    events = []
    with waits:
        end = session.train("c", TrainArgs(name=name, steps=steps, batch_size=4, seed=3), reporter=events.append)
    waits.on = False
    monkeypatch.setattr(Trainer, "training_step", step)
    monkeypatch.setattr(DataCollatorForLanguageModeling, "__call__", collate)
    monkeypatch.setattr(Trainer, "log", log)
    return end, waits.seen, logs, events


def test_a_step_waits_for_nothing_and_logs_what_the_trainer_would(session, monkeypatch):
    end, seen, logs, events = _run(session, monkeypatch, "lagged")
    plan = json.loads(Path("runs/lagged/run.json").read_text())["speed_plan"]
    assert plan["attention"] == "varlen" and end.status == "finished" and end.step == 6
    assert seen == [], f"a step read back from the device: {seen}"

    # The Trainer's own logging and TRL's own step: 8 reads a step with trl 1.16 (its metrics 4, its
    # token count 1, the tokens seen 1, the logged loss and norm 2), 16 over the two steps counted.
    _, before, reference, reference_events = _run(session, monkeypatch, "trainer", lag=False)
    assert len(before) >= 10, before

    # Same logs, each with its own step, epoch and tokens, in the same order, run summary last.
    assert [e["step"] for e in logs] == [1, 2, 3, 4, 5, 6, 6]
    assert [sorted(e) for e in logs] == [sorted(e) for e in reference]
    for ours, theirs in zip(logs, reference):
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value, rel=1e-6), (ours["step"], key)
    assert {"entropy", "mean_token_accuracy", "num_tokens", "grad_norm"} <= set(logs[0])
    # The live panel's events: each step once, in order, with the Trainer's figures.
    steps = [e for e in events if isinstance(e, StepEnd)]
    assert [(e.step, e.tokens) for e in steps] == [(e["step"], e["tokens"]) for e in logs[:-1]]
    assert [e.loss for e in steps] == pytest.approx([e.loss for e in reference_events if isinstance(e, StepEnd)])


def test_a_stop_logs_the_step_it_stops_on(session):
    """A stop asked for during step 3 ends the run at step 3 with step 3 logged, in run.json and the
    events (its logs are read at once, not after a step that never comes), and its checkpoint saved."""
    events = []

    def stop_in_step_3(event):
        events.append(event)
        if isinstance(event, StepEnd) and event.step == 2:  # lagged: said while step 3 runs
            session.request_stop()

    end = session.train("c", TrainArgs(name="halt", steps=8, batch_size=4), reporter=stop_in_step_3)
    record = json.loads(Path("runs/halt/run.json").read_text())
    assert end.status == "stopped" and end.step == 3 and record["step"] == 3
    assert [e.step for e in events if isinstance(e, StepEnd)] == [1, 2, 3]
    assert (Path("runs/halt/checkpoints") / "checkpoint-3").is_dir()


def test_a_loss_that_is_not_finite_is_said_once(session, monkeypatch):
    """The Trainer's filter no longer hides a NaN loss behind a stand-in: the panel shows it and
    a notice says what to do."""
    attach = type(session).attach_adapter

    def poisoned(self, *args, **kwargs):  # the new adapter's B weights made NaN: every loss is NaN
        model = attach(self, *args, **kwargs)
        for name, weight in model.named_parameters():
            if "lora_B" in name and weight.requires_grad:
                weight.data.fill_(math.nan)
        return model

    monkeypatch.setattr(type(session), "attach_adapter", poisoned)
    events = []
    end = session.train("c", TrainArgs(name="nan", steps=3, batch_size=4), reporter=events.append)
    assert end.step == 3 and all(math.isnan(e.loss) for e in events if isinstance(e, StepEnd))
    said = [e.message for e in events if isinstance(e, Notice) and "diverged" in e.message]
    assert len(said) == 1 and said[0].startswith("step 1's loss is nan") and "--lr" in said[0]


def test_a_stop_during_the_last_step_finishes_the_run(session):
    """Asked for when step 3 of 4 is said, while step 4 already runs: nothing is left to stop, so
    the run finishes (no checkpoint kept for a resume that has nothing to do)."""
    def stop(event):
        if isinstance(event, StepEnd) and event.step == 3:
            session.request_stop()

    end = session.train("c", TrainArgs(name="late", steps=4, batch_size=4), reporter=stop)
    assert (end.status, end.step) == ("finished", 4) and end.adapter_dir
    assert json.loads(Path("runs/late/run.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_the_step_s_loss_and_metrics_are_trl_s(family, tmp_path):
    """Our compute_loss (sft.py) against TRL's on the same packed batch, the MoE router loss included:
    the same loss and gradients, and the metrics TRL would log, once they are read."""
    import model_matrix
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from ipylora.engine.methods.sft import _trainer
    from ipylora.engine.tiny import tiny_model_path

    path = tiny_model_path() if family == "llama" else \
        model_matrix.build(next(f for f in model_matrix.FAMILIES if f.name == family), tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    rows = [{"input_ids": list(range(5 + i, 25 + 3 * i)), "labels": [-100] * 4 + list(range(9 + i, 25 + 3 * i))}
            for i in range(3)]
    import datasets

    trainer = _trainer(None, model=model, args=SFTConfig(str(tmp_path / "out"), use_cpu=True, report_to="none",
                                                         dataset_kwargs={"skip_prepare_dataset": True}, max_length=None,
                                                         padding_free=True),
                       train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    assert trainer.aux_loss_enabled == (family == "mixtral")
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(rows)
    model.train()
    losses, grads = [], []
    for compute in (trainer.compute_loss, functools.partial(SFTTrainer.compute_loss, trainer)):
        model.zero_grad()
        loss = compute(model, dict(batch))
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and torch.allclose(grads[0], grads[1], atol=1e-7)
    theirs = trainer._metrics["train"]
    ours = {name: [v.item() for v in values] for name, values in trainer._step_metrics.items()}
    assert set(ours) == {"entropy", "mean_token_accuracy"} | ({"aux_loss"} if family == "mixtral" else set())
    for name, values in ours.items():
        assert values == pytest.approx(theirs[name], rel=1e-6), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: counts the GPU's own synchronizing calls")
def test_on_a_gpu_a_step_syncs_only_where_trl_s_lm_head_selects_the_trained_tokens(session, monkeypatch):
    """CUDA's own count (torch.cuda.set_sync_debug_mode): steps 3 and 4 of a run. What remains is
    TRL's fused LM head picking the trained positions with a boolean mask (two in its forward, one
    in its backward); blocking batch copies and every read-back are gone."""
    import warnings

    from transformers import Trainer

    step, calls = Trainer.training_step, {"n": 0}

    def training_step(self, *args, **kwargs):
        calls["n"] += 1
        torch.cuda.set_sync_debug_mode("warn" if calls["n"] in (3, 4) else "default")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", training_step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        end = session.train("c", TrainArgs(name="gpu", steps=6, batch_size=4), reporter=None)
    torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    assert end.status == "finished" and len(syncs) <= 6, syncs
