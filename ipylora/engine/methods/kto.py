"""KTO: preference tuning from unpaired rows (prompt, completion, label: desirable or not), on TRL's KTOTrainer.

The tokens are `LoraDataset.unpaired_tokens` (paired data gives a desirable and an undesirable row
per pair), used as they are. The reference is the one in the resident model, as for DPO
(`preference.reference_model`): the base with adapters disabled, or the frozen `--from-adapter`.

KTO's KL term is estimated from mismatched (prompt, completion) pairs: each completion paired
with the prompt of its neighbour in a batch that TRL reads in order (sequential sampling). Rows
from paired data come as chosen, rejected of the same prompt side by side, so they are shuffled
once with the run's seed first: otherwise a "mismatched" pair would share its prompt.
"""

from __future__ import annotations

from ipylora.engine.methods import Context, Method
from ipylora.engine.methods.preference import config, positive, preference_defaults, reference_columns, reference_model


class KTO(Method):
    name = "kto"
    shape = "unpaired-preference"
    summary = "KTO: desirable / undesirable completions, no pairs needed, against a frozen reference"
    metrics = {"kl": "KL"}
    knobs = {"beta": 0.1}
    uses_reference = True
    min_micro_batch = 2

    def defaults(self, tiny: bool) -> dict:
        return preference_defaults(tiny)

    def check(self, args) -> list[str]:
        problems = positive("beta", args.beta)
        if 1 in (args.batch_size, args.micro_batch_size):
            # TRL refuses it: with one row per batch the KL estimate would be the reward itself.
            flag = "--micro-batch-size" if args.micro_batch_size == 1 else "--batch-size"
            problems.append(f"--method kto needs at least 2 rows per micro-batch (its KL term pairs neighbours): "
                            f"raise {flag} to 2 or more")
        return problems

    def tokens(self, part, tokenizer, max_length: int) -> dict:
        return part.unpaired_tokens(tokenizer, max_length)

    def lengths(self, tokens: dict, args=None) -> list[int]:
        return [len(p) + len(c) for p, c in zip(tokens["prompt_ids"], tokens["completion_ids"])]

    def build(self, ctx: Context):
        from trl import KTOConfig, KTOTrainer

        seed = ctx.args.seed

        class Trainer(KTOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                # TRL would extract a prompt, append EOS and tokenize again: our token columns are final.
                # What it adds that we need is the KL completion of each row: its batch neighbour's.
                dataset = dataset.shuffle(seed=seed).flatten_indices()
                if not self.calculate_KL:
                    return dataset

                def rotate(batch):
                    return {"KL_completion_ids": batch["completion_ids"][-1:] + batch["completion_ids"][:-1]}

                return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)

            def _precompute_ref_logps(self, dataset, name, batch_size):
                return reference_columns(self, dataset, batch_size, ("ref_logps", "ref_KL_logps"))

        args = config(KTOConfig, ctx.settings, beta=ctx.args.beta, max_length=None, precompute_ref_log_probs=True,
                      train_sampling_strategy="sequential")
        return Trainer(model=ctx.model, ref_model=reference_model(ctx.model, ctx.reference), args=args,
                       train_dataset=ctx.train_data, eval_dataset=ctx.eval_data, processing_class=ctx.tokenizer,
                       callbacks=ctx.callbacks)
