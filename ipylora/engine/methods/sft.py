"""Supervised fine-tuning: TRL's SFTTrainer on our own tokens (answers + EOS trained, prompts masked).

The data is tokenized by `LoraDataset.tokenize` (templates, loss mask, --max-length policy), so
the trainer is told to skip its own dataset preparation. Its eval loss is replaced by
`evaluate.token_loss` over the eval split's training tokens, the figure `%lora_eval` reports.
"""

from __future__ import annotations

from ipylora.engine.methods import Context, Method


class SFT(Method):
    name = "sft"
    shape = "sft"
    summary = "supervised fine-tuning on the answers (the default)"
    packed = True

    def tokens(self, part, tokenizer, max_length: int) -> dict:
        return part.tokenize(tokenizer, max_length)

    def lengths(self, tokens: dict, args=None) -> list[int]:
        return [len(ids) for ids in tokens["input_ids"]]

    def config(self, settings: dict):
        from trl import SFTConfig

        return SFTConfig(**settings, dataset_kwargs={"skip_prepare_dataset": True},
                         max_length=None)  # our tokenizer step already fitted every row

    def build(self, ctx: Context):
        return _trainer(ctx.eval_tokens, model=ctx.model, args=self.config(ctx.settings), train_dataset=ctx.train_data,
                        eval_dataset=ctx.eval_data, processing_class=ctx.tokenizer, callbacks=ctx.callbacks)


def _trainer(eval_tokens: dict | None, **kwargs):
    """An SFTTrainer whose eval loss is `evaluate.token_loss` over the eval split's training tokens.

    The Trainer's own eval_loss is a mean of per-batch means (a short row weighs as much as a
    long one), so it would not be the figure `%lora_eval` reports. Under torchrun every rank
    scores all eval rows (`self.model` is the FSDP-wrapped model, whose forward needs every rank;
    DDP's is the plain module), so every rank gets the same loss and the same early-stop decision.
    """
    from trl import SFTTrainer

    from ipylora.engine import compiled_layers
    from ipylora.engine.evaluate import token_loss

    class Trainer(SFTTrainer):
        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            model = self.model
            training = model.training
            model.eval()
            try:
                # eval batches are padded rows of any shape: compiled (graphed) layers would record each
                with compiled_layers.eager(model):
                    loss, count = token_loss(model, eval_tokens, self.args.per_device_eval_batch_size)
            finally:
                model.train(training)
            metrics = {f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}_tokens": count}
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return Trainer(**kwargs)


