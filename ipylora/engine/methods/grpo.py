"""GRPO: reinforcement learning from reward functions, on TRL's GRPOTrainer and the resident model.

Each step samples `--num-generations` completions per prompt with the adapter as it is (stopping at
EOS or `--max-completion-length`), scores them with the `--reward` functions (engine/rewards.py:
written in the notebook, built in, or imported), and moves the adapter towards the completions that
scored above their group's mean. The prompts are the dataset's prompt sides laid out by its
template as chat sends them (engine/prompts.py), so the answers trained are the answers chat gets.

- The tokens are ours: TRL would tokenize prompt text again; `_tokenize_prompts` returns our ids.
- The reference for the KL term (`--beta` > 0) is the resident model, never a second copy: TRL
  disables the adapters of a PeftModel (the base), and with `--from-adapter` the trainer gets the
  weightless view of preference.py (the start adapter, frozen).
- Reward functions see the dataset's columns by their names. TRL keeps `prompt`, `completion` and
  `completion_ids` to itself, so a table column of that name travels as `_column_<name>` and is
  renamed back before the function is called.
- Every generation batch's first prompt, its completions and their total rewards go to the live
  panel as samples (and to metrics.jsonl).
"""

from __future__ import annotations

import dataclasses
import math
import re

from ipylora.engine.methods import Context, Method
from ipylora.engine.packed import pack_padded_forward

TRL_COLUMNS = ("prompt", "completion", "completion_ids")
"""Dataset keys GRPOTrainer does not pass to reward functions."""
RENAMED = "_column_"

GRPO_METRICS = {"reward": "reward", "reward_std": "reward std", "kl": "KL",
                "completions/mean_length": "completion length", "completions/clipped_ratio": "cut at length cap"}
"""TRL's log key -> live-panel label; each reward's own mean is added as "reward: NAME"."""


def loss_types() -> list[str]:
    """The loss types TRL's GRPOConfig accepts (read from its field's help, so a new TRL adds its own)."""
    from trl import GRPOConfig

    field = next(f for f in dataclasses.fields(GRPOConfig) if f.name == "loss_type")
    supported = re.search(r"Supported values are (.*?)\.\s", field.metadata.get("help", ""))
    return re.findall(r"'([a-z_]+)'", supported.group(1)) if supported else ["dapo", "grpo", "dr_grpo", "bnpo"]


class GRPO(Method):
    name = "grpo"
    shape = "prompt"
    summary = "GRPO: sample completions per prompt, score them with --reward functions, reinforce the better ones"
    metrics = GRPO_METRICS
    knobs = {"beta": 0.0, "loss_type": "dapo", "temperature": 1.0, "rewards": (), "num_generations": 8,
             "max_completion_length": 256}
    """What the form shows (the tiny model's group and cap are smaller: `defaults`)."""
    uses_reference = True
    packed = True  # on a GPU: varlen attention, and the padded prompt + completion rows run packed
    generates = True  # rollouts: a micro-batch of completions per generate() call (the dry run sizes its cache)

    def defaults(self, tiny: bool) -> dict:
        # The embedded model: 4 completions of up to 16 tokens, a high constant lr (measured in
        # tests/test_grpo.py: a reward's preferred answer goes from ~half to all greedy answers in
        # ~40 steps). Real models: TRL's group of 8, 256 tokens, the usual LoRA RL learning rate.
        if tiny:
            return {"lr": 2e-3, "epochs": 1, "scheduler": "constant", "num_generations": 4,
                    "max_completion_length": 16, "max_grad_norm": 1.0}
        return {"lr": 1e-5, "epochs": 1, "num_generations": 8, "max_completion_length": 256}

    def check(self, args) -> list[str]:
        problems = []
        if not args.rewards:
            problems.append("--method grpo needs a reward: add --reward FN (a function in the notebook, or a "
                            "built-in such as exact:answer, contains:answer, regex:PATTERN, length:10-200)")
        if args.beta is not None and (args.beta < 0 or not math.isfinite(args.beta)):
            problems.append(f"--beta {args.beta:g} must be 0 or above (0: no KL term): try --beta 0.04")
        if args.num_generations is not None and args.num_generations < 2:
            problems.append(f"--num-generations {args.num_generations} must be 2 or more (GRPO compares completions "
                            "of the same prompt): try --num-generations 8")
        if args.max_completion_length is not None and args.max_completion_length < 1:
            problems.append(f"--max-completion-length {args.max_completion_length} must be 1 or more: try 256")
        if args.temperature is not None and not args.temperature > 0:
            problems.append(f"--temperature {args.temperature:g} must be above 0 (completions are sampled): try 1.0")
        if args.loss_type not in (None, "dapo"):
            known = loss_types()
            if args.loss_type not in known:
                problems.append(f"--loss-type {args.loss_type!r} is not a GRPO loss: use one of {', '.join(known)}")
        return problems

    def check_data(self, args, dataset, session) -> None:
        from ipylora.engine import rewards

        found = rewards.parse(list(args.rewards), namespace=getattr(session, "namespace", None))
        rewards.check_columns(found, [str(c) for c in dataset.columns])
        if args.gpus > 1:
            rewards.refuse_for_workers(found, args.gpus)

    def tokens(self, part, tokenizer, max_length: int) -> dict:
        return part.prompt_tokens(tokenizer, max_length)

    def lengths(self, tokens: dict, args=None) -> list[int]:
        # One example is one completion: its prompt and, at most, the completion cap, G per prompt.
        cap = args.max_completion_length if args is not None else 256
        group = args.num_generations if args is not None else 1
        return [len(p) + cap for p in tokens["prompt_ids"] for _ in range(group)]

    def examples(self, rows: int, args) -> int:
        return rows * args.num_generations

    def batch_multiple(self, args) -> int:
        return args.num_generations

    def metric_values(self, logs: dict) -> dict[str, float]:
        values = super().metric_values(logs)
        for key, value in logs.items():
            found = re.fullmatch(r"rewards/(.+)/mean", key)
            if found:
                values[f"reward: {found.group(1)}"] = float(value)
        return values

    def build(self, ctx: Context):
        from trl import GRPOConfig, GRPOTrainer

        from ipylora.engine import rewards
        from ipylora.engine.methods.preference import config, reference_model

        args = ctx.args
        found = rewards.parse(list(args.rewards), namespace=getattr(ctx.session, "namespace", None))
        funcs, weights = rewards.for_trl(found)
        funcs = [_columns_renamed_back(f) for f in funcs]
        tokenizer = ctx.tokenizer
        train_data, ids_of = _with_prompt_keys(ctx.train_data, tokenizer, ctx.dataset)
        eval_data = None
        if ctx.eval_data is not None and ctx.dataset.eval is not None:
            eval_data, eval_ids = _with_prompt_keys(ctx.eval_data, tokenizer, ctx.dataset.eval)
            ids_of.update(eval_ids)
        emit, reward_names = ctx.emit, [r.name for r in found]
        rollout_rows = ctx.settings["per_device_train_batch_size"]
        capped = _AllCapped(args.max_completion_length)

        class Trainer(GRPOTrainer):
            def _tokenize_prompts(self, prompts):
                # Our template's ids, not TRL's re-tokenization of the text they decode to.
                return [list(ids_of[p]) for p in prompts], None, {}

            def _generate_single_turn(self, prompt_ids, *args, **kwargs):
                # Under the run's autocast, as training is: the LoRA weights stay fp32 beside a bf16 base
                # (speed.py stops PEFT's input casts), which TRL's plain generate() would feed bf16 inputs.
                # A micro-batch of completions per generate() call, so the OOM retry's halving of the
                # micro-batch halves the rollout's KV cache too.
                completions, logprobs = [], None
                with self.accelerator.autocast():
                    for start in range(0, len(prompt_ids), rollout_rows):
                        ids, logprobs = super()._generate_single_turn(prompt_ids[start:start + rollout_rows],
                                                                      *args, **kwargs)
                        completions.extend(ids)
                return completions, logprobs

            def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
                per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
                if emit is not None and self.accelerator.is_main_process and self.model.training:
                    _emit_group(emit, self.state.global_step + 1, inputs, completions, per_func, weights, reward_names)
                    capped.see(completion_ids_list, emit)
                return per_func

        settings = {k: v for k, v in ctx.settings.items() if k != "padding_free"}
        grpo = config(GRPOConfig, settings, beta=args.beta, loss_type=args.loss_type or "dapo",
                      num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                      temperature=args.temperature, reward_weights=weights, log_completions=False,
                      # Cut completions do not train: without this the tiny model learned to stop
                      # emitting EOS (its completions grew to the cap); `_AllCapped` says when all are cut.
                      mask_truncated_completions=True,
                      shuffle_dataset=True)  # prompts in the order of the run's --seed (data_seed), as SFT reads rows
        trainer = Trainer(model=ctx.model, reward_funcs=funcs, args=grpo, train_dataset=train_data,
                          eval_dataset=eval_data, processing_class=tokenizer, callbacks=ctx.callbacks)
        if ctx.reference is not None and args.beta:
            # The frozen start adapter as the reference: TRL would look for an adapter named "ref".
            from trl.trainer.utils import add_fused_lm_head

            trainer.ref_model = reference_model(ctx.model, ctx.reference)
            add_fused_lm_head(trainer.ref_model, temperature=args.temperature)
            pack_padded_forward(trainer.ref_model)
        pack_padded_forward(ctx.model.get_base_model())
        return trainer


class _AllCapped:
    """Says once when every completion of several batches in a row ran to --max-completion-length:
    those are masked out of the loss (mask_truncated_completions), so the run learns nothing."""

    BATCHES = 3

    def __init__(self, cap: int):
        self.cap, self.run, self.said = cap, 0, False

    def see(self, completion_ids: list, emit) -> None:
        from ipylora.engine.events import Notice

        self.run = self.run + 1 if completion_ids and all(len(c) >= self.cap for c in completion_ids) else 0
        if self.run >= self.BATCHES and not self.said:
            self.said = True
            emit(Notice(f"every completion of the last {self.BATCHES} batches ran to --max-completion-length "
                        f"{self.cap} without ending: cut completions do not train, so nothing is learned; raise "
                        "--max-completion-length, or train the answers' format first (SFT, then --from-adapter)",
                        keep=True))


def _with_prompt_keys(data, tokenizer, dataset):
    """`data` (prompt_ids, _row, _prompt_text) plus TRL's `prompt` key (the prompt's text) and the table's
    columns for the reward functions; and the key -> ids map `_tokenize_prompts` reads."""
    prompt_ids = [list(ids) for ids in data["prompt_ids"]]
    keys = tokenizer.batch_decode(prompt_ids)
    ids_of = dict(zip(keys, prompt_ids))
    rows = list(data["_row"])
    data = data.add_column("prompt", keys)
    frame = dataset.frame
    for column in frame.columns:
        name = str(column)
        if name.startswith("_"):
            continue
        values = frame[column].tolist()
        data = data.add_column(RENAMED + name if name in TRL_COLUMNS else name, [values[r] for r in rows])
    return data, ids_of


def _columns_renamed_back(func):
    def reward_func(**kwargs):
        return func(**{(k[len(RENAMED):] if k.startswith(RENAMED) else k): v for k, v in kwargs.items()})

    reward_func.__name__ = reward_func.__qualname__ = func.__name__
    return reward_func


def _emit_group(emit, step: int, inputs, completions, per_func, weights, names) -> None:
    """The batch's first prompt and each of its completions with their weighted total reward."""
    import torch

    from ipylora.engine.events import Sample

    first = inputs[0].get("_prompt_text", inputs[0]["prompt"])
    total = (per_func.float().cpu() * torch.tensor(weights)[None]).nansum(dim=1)
    for i, item in enumerate(inputs):
        if item.get("_prompt_text", item["prompt"]) != first:
            continue
        text = completions[i] if isinstance(completions[i], str) else str(completions[i][-1].get("content", ""))
        per = ", ".join(f"{n} {float(v):.2f}" for n, v in zip(names, per_func[i].tolist()))
        emit(Sample(step=step, prompt=str(first), text=text, reward=float(total[i]),
                    detail=per if len(names) > 1 else ""))
