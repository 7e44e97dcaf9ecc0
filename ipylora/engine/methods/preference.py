"""Preference tuning on paired rows (prompt, chosen, rejected): DPO, SimPO and ORPO on TRL's trainers.

The tokens are ours (`LoraDataset.preference_tokens`: the SFT template spans, EOS, the
--max-length policy), so each trainer is told to use them as they are: TRL would otherwise
re-tokenize text it no longer has (DPO's `_prepare_dataset`, CPO/ORPO's `tokenize_row`).

DPO (and KTO, kto.py) compare the policy with a reference policy, and that reference lives in
the one resident PeftModel, never in a second copy of the base: the base with adapters disabled,
or with `--from-adapter` the frozen start adapter. TRL 1.16 cannot be told either: given a
PeftModel and no `ref_model` it reads `peft_config["default"]` (our adapter is named after the
run) and copies ".default." weights into a "ref" adapter of its own. So the trainer gets a
`ref_model` that is a view (`reference_model`): no weights of its own, its backbone is the
resident model's run under the reference adapter setting (`reference_setting`). The reference
log-probabilities are computed once per run, before the first step (`precompute_ref_log_probs`),
so a step costs the policy's forward and backward only.

SimPO (TRL's CPO with loss_type="simpo") and ORPO need no reference: `--from-adapter` only sets
their starting weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

from ipylora.engine.methods import Context, Method
from ipylora.engine.packed import pack_padded_forward

PREFERENCE_METRICS = {"rewards/margins": "margin", "rewards/accuracies": "reward accuracy"}
"""What DPO, SimPO and ORPO log that the live panel shows: the chosen-rejected reward margin and
the share of pairs where the chosen answer's reward is higher."""


# -- the reference policy inside the resident model ---------------------------------------------
@contextlib.contextmanager
def reference_setting(model, reference: str | None):
    """The resident PeftModel as the reference policy for the duration: adapters disabled (`reference`
    None) or the adapter `reference` active, in eval mode (no dropout); restored afterwards."""
    training = model.training
    model.eval()
    try:
        if reference is None:
            with model.disable_adapter():
                yield
        else:
            active = model.active_adapter
            model.set_adapter(reference)
            try:
                yield
            finally:
                # PEFT's set_adapter also moves requires_grad to the adapter it activates: this puts it back
                # (the run's adapter trainable, the reference frozen).
                model.set_adapter(active)
    finally:
        model.train(training)


def reference_model(model, reference: str | None):
    """A module TRL can use as `ref_model` that holds no weights: the resident model under `reference_setting`.

    TRL patches a `ref_model` with its fused LM head, which runs `self.base_model(...)` (the
    backbone) and projects through `self.get_output_embeddings()`: those two are the resident
    model's, the backbone run under the reference setting. The model is kept out of the module
    tree (`__dict__`), so what TRL does to a `ref_model` (dropout off, hashing, device placement)
    never walks the policy's weights twice.
    """
    import torch

    class Reference(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.__dict__["policy"] = model
            self.config = model.config

        def base_model(self, *args, **kwargs):
            with reference_setting(self.policy, reference):
                return self.policy.get_base_model().base_model(*args, **kwargs)

        def get_output_embeddings(self):
            return self.policy.get_output_embeddings()

        def forward(self, *args, **kwargs):
            with reference_setting(self.policy, reference):
                return self.policy(*args, **kwargs)

    return Reference()


def reference_columns(trainer, dataset, batch_size: int, columns: tuple[str, ...]):
    """`dataset` with the reference log-probabilities TRL's `compute_ref_log_probs` gives per row, as `columns`.

    This replaces TRL's `_precompute_ref_logps`, which keys a cache file on a hash of the reference's
    weights (a pass over all of them) in a temp folder of each process. Here every rank computes all
    rows in memory, in order, once per run (a resumed run computes the same values again).
    """
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False)
    values: list[list] = [[] for _ in columns]
    device = trainer.accelerator.device
    for batch in loader:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        for out, logps in zip(values, trainer.compute_ref_log_probs(trainer.ref_model, batch)):
            if logps is not None:
                out.extend(logps.float().cpu().tolist())
    for column, out in zip(columns, values):
        if out:
            dataset = dataset.add_column(column, out)
    return dataset


# -- shared by the paired methods ----------------------------------------------------------------
def config(config_class, settings: dict, **knobs):
    """`config_class` from the loop's common settings and the method's knobs.

    Settings the config has no field for (SFT-only speed options such as packing) are left out.
    Our rows are already fitted into --max-length, so the trainer's own cut is off (or, for the
    trainers that need a number, larger than any row).
    """
    fields = {f.name for f in dataclasses.fields(config_class)}
    kept = {k: v for k, v in settings.items() if k in fields}
    return config_class(**kept, **knobs)


def positive(flag: str, value, bound: float = 0.0) -> list[str]:
    if value is None or value > bound:
        return []
    return [f"--{flag} {value:g} must be above {bound:g}: try --{flag} 0.1"]


def pair_lengths(tokens: dict) -> list[int]:
    # A row is two sequences in the batch, prompt + chosen and prompt + rejected.
    return [2 * len(p) + len(c) + len(r)
            for p, c, r in zip(tokens["prompt_ids"], tokens["chosen_ids"], tokens["rejected_ids"])]


def pair_features(row: dict) -> dict:
    """One pair laid out as CPO/ORPO's collator reads it: `{prompt,chosen,rejected}_input_ids`,
    `_attention_mask`, and `_labels` with the prompt masked."""
    prompt = list(row["prompt_ids"])
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        answer = list(row[f"{side}_ids"])
        out[f"{side}_input_ids"] = prompt + answer
        out[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
        out[f"{side}_labels"] = [-100] * len(prompt) + answer
    return out


def preference_defaults(tiny: bool) -> dict:
    """TrainArgs defaults of the preference methods (DPO, SimPO, ORPO, KTO)."""
    # Measured on the embedded model (tests/test_preference_methods.py): a fresh adapter separates
    # 16 pairs (preference accuracy 1.0) in 8 steps at lr 5e-3. Real models: the usual LoRA
    # preference recipe, one epoch at a low learning rate.
    return {"lr": 5e-3, "epochs": 4, "scheduler": "constant"} if tiny else {"lr": 5e-5, "epochs": 1}


class Paired(Method):
    """What DPO, SimPO and ORPO share: paired tokens, their cost, the panel's metrics, beta > 0."""

    shape = "preference"
    metrics = PREFERENCE_METRICS

    def defaults(self, tiny: bool) -> dict:
        return preference_defaults(tiny)

    def check(self, args) -> list[str]:
        return positive("beta", args.beta)

    def tokens(self, part, tokenizer, max_length: int) -> dict:
        return part.preference_tokens(tokenizer, max_length)

    def lengths(self, tokens: dict, args=None) -> list[int]:
        return pair_lengths(tokens)


# -- DPO -----------------------------------------------------------------------------------------
def dpo_loss_types() -> list[str]:
    """The loss types TRL's DPOConfig accepts (read from its field's help, so a new TRL adds its own)."""
    from trl import DPOConfig

    field = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type")
    return re.findall(r"`'([a-z_]+)'`", field.metadata.get("help", ""))


class DPO(Paired):
    name = "dpo"
    summary = "direct preference optimization against a frozen reference (the base, or --from-adapter)"
    knobs = {"beta": 0.1, "loss_type": "sigmoid"}
    uses_reference = True
    packed = True  # on a GPU: varlen attention, and each padded batch runs padding-free (engine/packed.py)

    def check(self, args) -> list[str]:
        problems = super().check(args)
        if args.loss_type not in (None, "sigmoid"):
            known = dpo_loss_types()
            if args.loss_type not in known:
                problems.append(f"--loss-type {args.loss_type!r} is not a DPO loss: use one of {', '.join(known)}")
        return problems

    def build(self, ctx: Context):
        from trl import DPOConfig, DPOTrainer

        class Trainer(DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                # TRL would extract a prompt, append EOS and tokenize again: our token columns are final.
                return dataset

            def _precompute_ref_logps(self, dataset, name, batch_size):
                return reference_columns(self, dataset, batch_size, ("ref_chosen_logps", "ref_rejected_logps"))

        # TRL 1.16 turns its own padding_free off with a warning; our packing is done below instead.
        settings = {k: v for k, v in ctx.settings.items() if k != "padding_free"}
        args = config(DPOConfig, settings, beta=ctx.args.beta, loss_type=ctx.args.loss_type or "sigmoid",
                      max_length=None, precompute_ref_log_probs=True)
        trainer = Trainer(model=ctx.model, ref_model=reference_model(ctx.model, ctx.reference), args=args,
                          train_dataset=ctx.train_data, eval_dataset=ctx.eval_data, processing_class=ctx.tokenizer,
                          callbacks=ctx.callbacks)
        # TRL has patched both with its fused LM head by now; with varlen attention (a GPU) their padded
        # chosen/rejected batches run as one packed row.
        pack_padded_forward(ctx.model.get_base_model())
        pack_padded_forward(trainer.ref_model)
        return trainer


# -- SimPO and ORPO (reference-free) -------------------------------------------------------------
def _tokenized_rows(trainer_class):
    """`trainer_class` (CPO, ORPO) reading our token columns: `tokenize_row` only lays them out."""

    class Trainer(trainer_class):
        def tokenize_row(self, feature, model=None):
            return pair_features(feature)

    return Trainer


LONGEST = 10**6
"""max_length for the trainers that need a number (CPO, ORPO): above any row we fitted."""


class SIMPO(Paired):
    name = "simpo"
    summary = "SimPO: length-normalised preference margin, no reference model"
    knobs = {"beta": 2.0, "gamma": 1.0}

    def check(self, args) -> list[str]:
        problems = super().check(args)
        if args.gamma is not None and args.gamma < 0:
            problems.append(f"--gamma {args.gamma:g} must be 0 or above: try --gamma 1")
        return problems

    def build(self, ctx: Context):
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        # SimPO is CPO's simpo loss without CPO's behaviour-cloning term (cpo_alpha=0), as in the paper.
        args = config(CPOConfig, ctx.settings, loss_type="simpo", beta=ctx.args.beta, simpo_gamma=ctx.args.gamma,
                      cpo_alpha=0.0, max_length=LONGEST)
        return _tokenized_rows(CPOTrainer)(model=ctx.model, args=args, train_dataset=ctx.train_data,
                                           eval_dataset=ctx.eval_data, processing_class=ctx.tokenizer,
                                           callbacks=ctx.callbacks)


class ORPO(Paired):
    name = "orpo"
    summary = "ORPO: SFT loss plus an odds-ratio preference term, no reference model"
    knobs = {"beta": 0.1}

    def build(self, ctx: Context):
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = config(ORPOConfig, ctx.settings, beta=ctx.args.beta, max_length=LONGEST)
        return _tokenized_rows(ORPOTrainer)(model=ctx.model, args=args, train_dataset=ctx.train_data,
                                            eval_dataset=ctx.eval_data, processing_class=ctx.tokenizer,
                                            callbacks=ctx.callbacks)
