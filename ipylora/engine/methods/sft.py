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
    import torch
    from trl import SFTTrainer

    from ipylora.engine import compiled_layers
    from ipylora.engine.evaluate import token_loss
    from ipylora.engine.lagged import LaggedLogs

    class Trainer(LaggedLogs, SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or not self._lagging or not self._plain_loss():
                if self.model.training:
                    self._stop_lagging()  # TRL's own step reads its metrics back as it computes them
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # TRL's loss for the plain case (its fused LM head, mean over the step's trained tokens),
            # with its entropy and token accuracy kept on the device until the step is logged
            # (lagged.py): TRL reads each back as soon as it is computed, which waits for the GPU.
            inputs["use_cache"] = False
            if self.aux_loss_enabled:  # MoE: the router's load-balancing loss comes back with the outputs
                inputs["output_router_logits"] = True
            outputs = model(**inputs, fused_lm_head=True)
            num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
            if self.aux_loss_enabled:
                # a per-micro-batch mean: averaged over the accumulation steps when the loss is a sum over them
                steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
                loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            with torch.no_grad():
                valid = outputs.label_mask.sum().clamp(min=1)  # no trained token: both are 0, as TRL logs them
                self._step_metric("entropy", outputs.entropy.sum() / valid)
                self._step_metric("mean_token_accuracy", outputs.is_top1.sum() / valid)
                if self.aux_loss_enabled:
                    self._step_metric("aux_loss", outputs.aux_loss)
            if "attention_mask" in inputs:
                batch_tokens = int(inputs["attention_mask"].sum())
            else:  # padding-free: one packed row, every position a token
                batch_tokens = inputs["position_ids"].size(1)
            self._total_train_tokens += batch_tokens // self._tp_size
            self._host_metric("num_tokens", self._total_train_tokens)
            return loss

        def _plain_loss(self) -> bool:
            """Whether TRL's compute_loss would take its plain branch: one process, nll, no label
            smoothing or custom loss (nor sequence parallelism, which needs several processes)."""
            return (self.model.training and self.compute_loss_func is None and self.label_smoother is None
                    and self.args.loss_type == "nll" and self.accelerator.num_processes == 1)

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


