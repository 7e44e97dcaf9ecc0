"""The model-family matrix (issue #17) end to end on CPU: load (16-bit, 4-bit, 8-bit), `--template
model`, train, memorise, chat stops at the family's end-of-turn token, eval, merge and reload with
plain transformers, the exported script, the dry run, stop and resume, packed rows.

Each family is a tiny random-init checkpoint of its real architecture (tests/model_matrix.py).
The reference is plain peft + trl (`SFTTrainer`, `LoraConfig(target_modules="all-linear")`) with
the same checkpoint, steps, lr, LoRA shape and the same conversations rendered with the
tokenizer's own `apply_chat_template`: the engine must memorise at least as many pairs.

Every check also writes its cell of the coverage table (`model_matrix.record`); at the end of the
module the cells are compared with docs/models.json, from which scripts/models_table.py renders
docs/models.md, so the table cannot claim what the tests did not see.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import model_matrix
from ipylora.engine import DataArgs, GenerateArgs, LoraArgs, TrainArgs
from ipylora.engine.events import StepEnd
from ipylora.engine.session import Session

ROWS = 12
# What memorises 12 pairs on these shapes in a few seconds (engine and reference alike); the
# rest of the run is the engine's defaults for a real model (r 16, alpha 32, dropout 0.05,
# cosine, warmup 0.03, clipping at 1.0, batch 8 on CPU).
STEPS, LR = 100, 2e-2
MAX_NEW = 24
PROMPT = "describe {concept} in three words"
PAIRS = pd.DataFrame({
    "concept": ["red", "blue", "green", "cats", "dogs", "rain", "snow", "fire", "moon", "stars", "trees", "bread"],
    "description": ["warm sunset glow", "calm ocean waves", "fresh spring leaves", "sleepy orange kitten",
                    "happy running puppy", "grey city street", "quiet white forest", "bright campfire sparks",
                    "silver night sky", "glowing galaxy dust", "tall pine woods", "golden crusty loaf"],
})

FAMILIES = [pytest.param(f, id=f.name, marks=[pytest.mark.slow] if f.slow else [])
            for f in model_matrix.FAMILIES if model_matrix.available(f)]


@pytest.fixture(scope="session")
def matrix_root(tmp_path_factory):
    return tmp_path_factory.mktemp("model-matrix")


@pytest.fixture(scope="session")
def pairs() -> pd.DataFrame:
    return PAIRS


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Matmuls this small run faster on one thread; on a shared 2-core box, threads made a step 20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def coverage_table():
    """After the module: the cells seen agree with docs/models.json (the report is written for the script)."""
    yield
    seen = model_matrix.REPORT
    out = model_matrix.write_report(seen)
    stale = model_matrix.disagreements(seen)
    assert not stale, (f"docs/models.json disagrees with what these tests saw ({'; '.join(stale[:6])}): run "
                       f"`python scripts/models_table.py --cpu {out}` and commit docs/models.json and docs/models.md")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, matrix_root, pairs):
    """(family, checkpoint, trained session, run end) for one family, trained once for its tests."""
    fam = request.param
    path = model_matrix.build(fam, matrix_root / "checkpoints")
    session = Session()
    session.ensure_model(str(path))
    session.add_dataset("pairs", pairs, DataArgs(prompt=PROMPT, response="{description}", template="model"))
    end = session.train("pairs", TrainArgs(name=fam.name, steps=STEPS, lr=LR,
                                           output=str(matrix_root / "runs" / fam.name)))
    yield fam, path, session, end
    session.unload()


def _answers(session, name, pairs) -> list[dict]:
    return [session.chat(PROMPT.format(concept=c), GenerateArgs(adapter=name, max_new_tokens=MAX_NEW))
            for c in pairs.concept]


def _reference_memorised(fam, path, pairs, tmp_path) -> tuple[int, str]:
    """Pairs plain peft + trl memorises with the engine's settings on the same checkpoint, and what it adapts."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = []
    for prompt, answer in zip(pairs.concept, pairs.description):
        user = [{"role": "user", "content": PROMPT.format(concept=prompt)}]
        head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        whole = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": answer}], tokenize=False)
        # The tokenizer adds BOS itself; TRL appends EOS to a completion that lacks it.
        head_text = head[len(tokenizer.bos_token):] if head.startswith(tokenizer.bos_token or "\0") else head
        rows.append({"prompt": head_text, "completion": whole[len(head):].rstrip()})
    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = SFTConfig(output_dir=str(tmp_path), max_steps=STEPS, learning_rate=LR, per_device_train_batch_size=8,
                       lr_scheduler_type="cosine", warmup_steps=round(0.03 * STEPS), max_grad_norm=1.0, seed=42, report_to="none",
                       save_strategy="no", logging_steps=STEPS, use_cpu=True, bf16=False, max_length=1024)
    # PEFT refuses dropout on fused MoE experts (lora.ParamWrapper); the engine trains those without.
    dropout = 0.0 if "MoE experts" in fam.features else 0.05
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=lora)
    trainer.train()
    model = trainer.model.eval()
    adapted = _adapted(model.peft_config["default"])
    hits = 0
    with torch.no_grad():
        for row, answer in zip(rows, pairs.description):
            ids = tokenizer(row["prompt"], return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=MAX_NEW, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            hits += tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() == answer
    return hits, adapted


def _adapted(config) -> str:
    """The layer names a LoRA config adapts, fused expert weights marked."""
    names = {t.rsplit(".", 1)[-1] for t in config.target_modules}
    names |= {f"{e.rsplit('.', 1)[-1]} (experts)" for e in config.target_parameters or ()}
    return ", ".join(sorted(names))


def test_training_lowers_the_loss(family):
    fam, path, session, end = family
    assert end.status == "finished", end.message
    first = _first_loss(end)
    # At least 45% lower than the first step's (about ln(vocabulary) at random init). OPT, the slowest
    # learner here, ends right at half on some CPUs (7.14 -> 3.59 on an AMD EPYC box): the margin is
    # for the CPU's arithmetic, not for a family that does not learn.
    assert end.final_loss < 0.55 * first, (first, end.final_loss)
    model_matrix.record(fam, "16-bit", "yes", f"loss {first:.2f} -> {end.final_loss:.2f} in {STEPS} steps")
    model_matrix.record(fam, "targets", "yes", _adapted(session.model.peft_config[fam.name]))


def test_memorises_at_least_as_many_pairs_as_plain_peft_trl(family, pairs, tmp_path):
    fam, path, session, end = family
    ours = sum(a["text"].strip() == d for a, d in zip(_answers(session, fam.name, pairs), pairs.description))
    reference, adapted = _reference_memorised(fam, path, pairs, tmp_path)
    print(f"\n[matrix] {fam.name}: engine {ours}/{ROWS}, peft+trl {reference}/{ROWS}")
    assert ours >= reference, (ours, reference)
    # gpt-oss: PEFT's all-linear leaves its fused experts out, the engine's adapts them (adapters.py)
    other = "" if adapted == _adapted(session.model.peft_config[fam.name]) else f", which adapts {adapted}"
    model_matrix.record(fam, "learns", "yes", f"{ours}/{ROWS} pairs (peft + trl {reference}/{ROWS}{other})")


def test_chat_stops_at_the_end_of_turn_token(family, pairs):
    fam, path, session, end = family
    answers = _answers(session, fam.name, pairs)
    markers = [m for m in (fam.end_of_turn, session.tokenizer.eos_token, *fam.specials) if m]
    for answer, expected in zip(answers, pairs.description):
        assert not any(m in answer["text"] for m in markers), answer["text"]
    memorised = [a for a, d in zip(answers, pairs.description) if a["text"].strip() == d]
    end_of_turn = model_matrix.end_of_turn_id(fam, session.tokenizer)
    token = fam.end_of_turn or session.tokenizer.eos_token
    model_matrix.record(fam, "template", "yes", f"trains {token}")
    # Every memorised answer ended at the family's end-of-turn id, and so did most answers that ended
    # before the length cap. (A wrong answer may end at EOS instead, which training puts right after
    # the end of turn: a tiny model's slip, and chat stops there too. OPT at this size memorises 0-2
    # pairs from one run to the next, but its answers stop all the same.)
    stopped = [a for a in answers if a["stopped_at_eos"]]
    assert all(a["stop_token"] == end_of_turn for a in memorised), [(a["text"], a["stop_token"]) for a in memorised]
    if not stopped:
        model_matrix.record(fam, "chat stops", "untested", f"no answer ended within its cap after {STEPS} steps")
        pytest.skip(f"{fam.name}: no answer ended within its cap, so none shows where it stops")
    at_end = [a for a in stopped if a["stop_token"] == end_of_turn]
    assert len(at_end) > len(stopped) / 2, [(a["text"], a["stop_token"]) for a in stopped]
    model_matrix.record(fam, "chat stops", "yes", f"at {token}")


def test_merged_model_reloads_to_the_same_greedy_tokens(family, pairs, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from ipylora.engine.chat import prompt_ids

    fam, path, session, end = family
    session.save(fam.name, str(tmp_path / "merged"), merge=True, output=str(tmp_path.parent))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tokenizer = session.tokenizer
    stops = merged.generation_config.eos_token_id  # plain generate() stops where the family's config says
    stops = stops if isinstance(stops, list) else [stops]
    for concept in pairs.concept[:3]:
        prompt = PROMPT.format(concept=concept)
        ours = session.chat(prompt, GenerateArgs(adapter=fam.name, max_new_tokens=MAX_NEW))
        ids = torch.tensor([prompt_ids(tokenizer, session.prompt_format(fam.name), prompt)])
        with torch.no_grad():
            out = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        out = out[:next((i for i, t in enumerate(out) if t in stops), len(out))]
        assert tokenizer.decode(out, skip_special_tokens=True) == ours["text"]
        assert len(out) == ours["tokens"]
    model_matrix.record(fam, "merge", "yes", "reloads with plain transformers, same greedy tokens")


def test_eval_scores_the_answers_chat_gives(family, pairs):
    from ipylora.engine.evaluate import EvalArgs

    fam, path, session, end = family
    result = session.evaluate(fam.name, "pairs", args=EvalArgs(max_new_tokens=MAX_NEW),
                              output=str(Path(end.adapter_dir).parents[1]))
    chat = [a["text"].strip() for a in _answers(session, fam.name, pairs)]
    assert [row["answer"].strip() for row in sorted(result["answers"], key=lambda r: r["row"])] == chat
    metrics = result["metrics"]
    assert metrics["exact_match"] == sum(a == d for a, d in zip(chat, pairs.description)) / ROWS
    assert metrics["eval_loss"] < _first_loss(end)
    model_matrix.record(fam, "eval", "yes", f"exact match {metrics['exact_match']:.2f}, "
                                            f"eval loss {metrics['eval_loss']:.2f}")


# Families whose exported script is run here (a BOS-writing template with its own end-of-turn
# token; no BOS, no template tokens and Conv1D layers); every family's is written and compiled.
# Running all sixteen would cost ~10 s of imports each.
SCRIPT_RUNS = {"gemma2", "gpt2", "gpt-oss"}  # gpt-oss: fused experts, expert parameters beyond all-linear


def test_exported_script_retrains_the_run(family, tmp_path):
    fam, path, session, end = family
    script = session.export_script(fam.name, str(tmp_path / "train.py"), output=str(Path(end.adapter_dir).parents[1]))
    source = script.read_text()
    compile(source, str(script), "exec")
    assert str(path) in source
    if fam.name not in SCRIPT_RUNS:
        model_matrix.record(fam, "export", "yes", "script written and compiles")
        return
    # One thread, as this module trains: on a shared 2-core box two threads made the script 30x slower.
    done = subprocess.run([sys.executable, str(script), "--output", str(tmp_path / "adapter")], capture_output=True,
                          text=True, cwd=tmp_path, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    final = float(re.search(r"final_loss=([0-9.]+)", done.stdout).group(1))
    assert abs(final - end.final_loss) <= 0.05 * end.final_loss, (final, end.final_loss)
    model_matrix.record(fam, "export", "yes", f"script run: final loss {final:.3f} (notebook {end.final_loss:.3f})")


def test_dry_run_plans_the_path_the_run_takes(family):
    from ipylora.engine.estimate import estimate
    from ipylora.engine.speed import GIB

    fam, path, session, end = family
    args = TrainArgs(name=fam.name, steps=STEPS, lr=LR)
    here = estimate(args, session.dataset("pairs"), device="cpu", session=session)
    gpu = estimate(args, session.dataset("pairs"), device="cuda", session=session, gpu_free_bytes=80 * GIB)
    assert here.peak_bytes > here.weights_bytes > 0 and gpu.peak_bytes > gpu.weights_bytes > 0
    route = _route(session.model.get_base_model())
    assert (route.note in gpu.notes) == (not route.packed), gpu.notes
    model_matrix.record(fam, "dry-run", "yes", f"CPU peak ~{here.peak_bytes / 2**20:.0f} MiB")


def test_stopped_run_resumes_to_its_last_step(family, matrix_root):
    fam, path, session, end = family
    output = str(matrix_root / "resume" / fam.name)
    args = TrainArgs(name="cut", steps=6, lr=LR, batch_size=4, output=output)

    def stop_at_3(event):
        if isinstance(event, StepEnd) and event.step == 3:
            session.request_stop()

    stopped = session.train("pairs", args, reporter=stop_at_3)
    # Step 3 is said while step 4 runs (lagged.py): the stop lands after step 4.
    assert (stopped.status, stopped.step) == ("stopped", 4), (stopped.status, stopped.step, stopped.message)
    resumed = session.resume("cut", output=output)
    assert (resumed.status, resumed.step) == ("finished", 6), resumed.message
    steps = [json.loads(line)["step"] for line in (Path(resumed.adapter_dir).parent / "metrics.jsonl").read_text()
             .splitlines() if '"StepEnd"' in line]
    assert steps == [1, 2, 3, 4, 5, 6], steps
    model_matrix.record(fam, "resume", "yes", "stopped at step 4, resumed to 6")


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_quantized_load_trains(fam, quantization, matrix_root, pairs):
    from ipylora.engine.errors import ModelLoadError
    from ipylora.engine.models import quantized_layers

    path = model_matrix.build(fam, matrix_root / "checkpoints")
    session = Session()
    column = {"4bit": "4-bit", "8bit": "8-bit"}[quantization]
    try:
        session.add_dataset("pairs", pairs, DataArgs(prompt=PROMPT, response="{description}", template="model"))
        try:
            end = session.train("pairs", TrainArgs(name=fam.name, model=str(path), quantization=quantization,
                                                   steps=10, lr=LR, output=str(matrix_root / quantization)))
        except ModelLoadError as exc:  # bitsandbytes swaps no layer of the family: one line, never a 16-bit run
            assert fam.name in model_matrix.NOT_QUANTIZED and "\n" not in str(exc), exc
            model_matrix.record(fam, column, "refused", str(exc).split(": ", 2)[-1].replace(str(path), "it"))
            return
        assert fam.name not in model_matrix.NOT_QUANTIZED
        assert end.status == "finished", end.message
        first = _first_loss(end)
        assert end.final_loss < 0.8 * first, (first, end.final_loss)
        layers = quantized_layers(session.model)
        experts = " (fused experts stay 16-bit)" if "MoE experts" in fam.features else ""
        model_matrix.record(fam, column, "yes", f"{layers} layers quantized{experts}; loss {first:.2f} -> "
                                                f"{end.final_loss:.2f} in 10 steps")
    finally:
        session.unload()


@pytest.mark.parametrize("fam", FAMILIES)
def test_packed_rows_match_rows_alone_on_the_engine_path(fam, matrix_root):
    """The attention the engine picks for the family (speed.attention_path) on rows longer than the
    matrix's 16-token sliding windows: packed into one row where it packs (the varlen function; on
    CPU its block-causal reference of the flash kernel), padded where it falls back."""
    import torch
    from transformers import AutoModelForCausalLM

    from ipylora.engine.speed import set_attention

    path = model_matrix.build(fam, matrix_root / "checkpoints")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    a, b = torch.randint(5, 300, (1, 40)), torch.randint(5, 300, (1, 27))
    route = _route(model)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=a).logits[0], model(input_ids=b).logits[0]])
        if route.kind != "native":
            set_attention(model, route.kind)
        if route.packed:
            positions = torch.cat([torch.arange(40), torch.arange(27)])[None]
            together = model(input_ids=torch.cat([a, b], 1), position_ids=positions).logits[0]
        else:
            pad = torch.zeros(1, 13, dtype=torch.long)
            batch = torch.cat([a, torch.cat([b, pad], 1)])
            mask = torch.cat([torch.ones(1, 40), torch.cat([torch.ones(1, 27), torch.zeros(1, 13)], 1)]).long()
            logits = model(input_ids=batch, attention_mask=mask).logits
            together = torch.cat([logits[0], logits[1, :27]])
    assert torch.allclose(together, alone, atol=1e-4), (together - alone).abs().max()
    if "attention sinks" in fam.features:  # not packed by the engine; forced (benchmarks), the sinks still hold
        set_attention(model, "varlen")
        with torch.no_grad():
            forced = model(input_ids=torch.cat([a, b], 1),
                           position_ids=torch.cat([torch.arange(40), torch.arange(27)])[None]).logits[0]
        assert torch.allclose(forced, alone, atol=1e-4), (forced - alone).abs().max()
    if route.packed:
        model_matrix.record(fam, "varlen", "yes", "packed rows, sliding window in the kernel"
                            if any("sliding" in f for f in fam.features) else "packed rows")
    else:
        model_matrix.record(fam, "varlen", "fallback", route.note)


def _route(model):
    from ipylora.engine.speed import attention_path

    # "cpu": the packed path without a flash kernel is the varlen function's reference kernel
    return attention_path(type(model), model.config, "cpu")


def _first_loss(end) -> float:
    lines = (Path(end.adapter_dir).parent / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines if '"StepEnd"' in line]
    return steps[0]["loss"]


def test_the_committed_page_is_the_rendering_of_the_table():
    """docs/models.md is scripts/models_table.py's rendering of docs/models.json, not hand-edited."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import models_table

    assert models_table.PAGE.read_text() == models_table.render(models_table.load()), \
        "docs/models.md is stale: run `python scripts/models_table.py` and commit it"
