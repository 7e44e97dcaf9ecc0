"""`%lora_train --dry-run`: the plan and estimates a run will have, with nothing loaded.

The estimate must describe the run that follows: same batch, accumulation, steps and (on a GPU)
checkpointing, weights and adapter sizes equal to the loaded model's. The total is not compared
with the process's RSS here: on the 2-layer tiny model the tensors are a few MiB, and how much RSS
grows depends on what earlier tests left in the allocator (measured 50 to 170 MiB for the same
run). The peak is checked against measured GPU peaks by bench/dry_run_check.py (bench/RESULTS.md).
"""

import json
from pathlib import Path

import pytest

from support import CONCEPTS, PROMPT, assert_one_line_error, ipython_shell, run_cell_output

DATASET_LINE = f'concepts --from {CONCEPTS} --prompt "{PROMPT}" --response "{{description}}"'


@pytest.fixture
def shell(fresh_session):
    yield ipython_shell()


def test_dry_run_prints_the_plan_and_loads_nothing(shell, capsys, monkeypatch):
    import transformers

    from ipylora.engine import get_session, models

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(models, "load_model", refuse)
    shell.run_line_magic("lora_dataset", DATASET_LINE)
    out, err = run_cell_output(shell, capsys, "%lora_train concepts --dry-run")
    text = (out + err).strip()
    assert "Traceback" not in text, text
    for label in ("ipylora/tiny-llama on cpu", "trainable (LoRA)", "estimated peak", "8 rows = 8 per micro-batch",
                  "checkpointing", "tokens/s", "301 (43 epochs)", "ETA"):
        assert label in text, f"{label!r} not in\n{text}"
    session = get_session()
    assert session.model is None and session.load_count == 0
    assert not Path("runs").exists()


def test_dry_run_errors_are_one_line(shell, capsys):
    shell.run_line_magic("lora_dataset", DATASET_LINE)
    for line, needle in (("%lora_train concepts --model /no/such/model --dry-run", "/no/such/model"),
                         ("%lora_train concepts --target-modules qq_proj --dry-run", "matches no layer"),
                         ("%lora_train concepts --r 0 --dry-run", "--r 0"),
                         ("%lora_train --dry-run", "DATASET")):
        assert_one_line_error(shell, capsys, line, needle)


def test_estimate_matches_the_run_that_follows(fresh_session, concepts):
    from ipylora.engine import DataArgs, TrainArgs, speed
    from ipylora.engine.estimate import estimate
    from ipylora.engine.train import micro_batch

    session = fresh_session
    dataset = session.add_dataset("concepts", concepts, DataArgs(prompt=PROMPT, response="{description}"))
    args = TrainArgs(batch_size=6, micro_batch_size=4, epochs=2)
    est = estimate(args, dataset, session=session)
    assert session.model is None
    end = session.train("concepts", args)
    record = json.loads((Path("runs") / end.name / "run.json").read_text())
    ran = TrainArgs(**{**record["train"], "samples": (), "lora": None})
    # The plan: 6 rows as micro-batches of 3 (the largest divisor of 6 that is <= 4) x 2.
    assert (est.batch_size, est.micro_batch, est.accumulation) == (ran.batch_size, micro_batch(ran), 2)
    assert est.steps == record["total_steps"] == end.step == 20
    assert est.checkpointing is False and "speed_plan" not in record
    # What was counted on the meta device is what got loaded.
    model = session.model
    base = model.get_base_model()
    frozen = [p for p in base.parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert est.shape.lora == sum(p.numel() for p in trainable)
    assert est.shape.params == sum(p.numel() for p in frozen)
    assert est.weights_bytes == sum(p.numel() * p.element_size() for p in frozen)
    assert est.optimizer_bytes == speed.trainable_state_bytes(model)
    assert est.peak_bytes == (est.weights_bytes + est.optimizer_bytes + est.activation_bytes
                              + est.lm_head_bytes + est.allowance_bytes)


def test_gpu_plan_is_the_one_fast_settings_makes(fresh_session, concepts):
    """What-if GPU planning (no GPU needed) against speed.fast_settings on the real adapter model."""
    from ipylora.engine import DataArgs, TrainArgs, speed
    from ipylora.engine.estimate import estimate
    from ipylora.engine.models import Precision

    session = fresh_session
    dataset = session.add_dataset("concepts", concepts, DataArgs(prompt=PROMPT, response="{description}"))
    session.train("concepts", TrainArgs(steps=1))
    lengths = [len(ids) for ids in dataset.tokenize(session.tokenizer, 1024)["input_ids"]]
    seen = set()
    for free in (int(2.9 * speed.GIB), 3 * speed.GIB):  # just under / over the checkpointing threshold
        est = estimate(TrainArgs(), dataset, device="cuda", gpu_free_bytes=free, session=session)
        # The real run measures free memory after loading: the budget it then gets.
        budget = int(0.88 * (free - est.weights_bytes - 4 * est.shape.lora))
        fast = speed.fast_settings(session.model, session.tokenizer, lengths, Precision("float32", False, False),
                                   "cpu", force=True, memory_budget=budget, dropout=0.0, liger=False)
        plan = fast["_plan"]
        assert (est.checkpointing, est.step_tokens, est.batch_size, est.accumulation, est.micro_batch) == \
            (plan.checkpointing, plan.step_tokens, plan.batch_size, plan.accumulation,
             fast["per_device_train_batch_size"])
        seen.add(plan.checkpointing)
    assert seen == {True, False}


def test_memory_cap_plans_under_it(fresh_session, concepts, capsys):
    """`--memory GIB` bounds the plan: a tight cap turns checkpointing on and shrinks the step, a cap
    below the model refuses in one line; the dry run plans the same way."""
    from ipylora.engine import DataArgs, TrainArgs, speed
    from ipylora.engine.errors import ConfigError
    from ipylora.engine.estimate import estimate

    session = fresh_session
    dataset = session.add_dataset("concepts", concepts, DataArgs(prompt=PROMPT, response="{description}"))
    from transformers import AutoConfig

    from ipylora.engine.tiny import tiny_model_path

    config = AutoConfig.from_pretrained(str(tiny_model_path()))
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 1536, 8960, 28  # a 1.5B shape
    lengths = [600] * 1000
    common = dict(free_bytes=120 * speed.GIB, resident_bytes=3 * speed.GIB, trainable_bytes=300 * 2**20,
                  quantization=None, dropout=0.05, batch_size=None)
    free_plan = speed.plan_batch(config, lengths, **common)
    capped = speed.plan_batch(config, lengths, memory_cap=7 * speed.GIB, **common)
    assert not free_plan.checkpointing and capped.checkpointing
    assert capped.step_tokens < free_plan.step_tokens
    assert 3 * speed.GIB + capped.budget_bytes <= 7 * speed.GIB
    with pytest.raises(ConfigError, match=r"--memory 4 GiB is too little.*give --memory \d+ or more"):
        speed.plan_batch(config, lengths, memory_cap=4 * speed.GIB, **common)
    # The dry run reads --memory too: a cap far above the model plans as free memory does, one under it refuses.
    roomy = estimate(TrainArgs(memory=100.0), dataset, device="cuda", gpu_free_bytes=8 * speed.GIB, session=session)
    plain = estimate(TrainArgs(), dataset, device="cuda", gpu_free_bytes=8 * speed.GIB, session=session)
    assert (roomy.batch_size, roomy.step_tokens) == (plain.batch_size, plain.step_tokens)
    with pytest.raises(ConfigError, match="--memory 0.01 GiB is too little"):
        estimate(TrainArgs(memory=0.01), dataset, device="cuda", gpu_free_bytes=8 * speed.GIB, session=session)
