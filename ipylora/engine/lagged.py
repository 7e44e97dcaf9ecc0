"""Training steps that do not wait for the GPU: each step's logs are read back one step later.

Every `.item()`, `bool(tensor)` or blocking copy to the host makes the host wait until the GPU has
run everything queued before it. The Trainer and TRL do about a dozen a step:
- the loss-is-finite check after each micro-batch;
- the tokens seen;
- the logged loss and gradient norm;
- TRL's entropy and token accuracy, and its token count;
- transformers' check whether the rows are packed (`speed.packed_rows_unchecked`).

Session 23's profile counted 14 `.item()`s and 19 stream syncs a step (bench/RESULTS.md). Each
sync empties the GPU's queue. The GPU then idles for as long as the host takes to its next launch:
the optimizer's Python, the callbacks, collating the next batch, the next forward's first layers.

`LaggedLogs` (a Trainer mixin) logs step N once step N+1 has been queued. As step N ends, its
values are copied to pinned memory behind an event (`Readback`). They are read when that event has
passed, which it has long before the host catches up with step N+1. What the logs say does not
change: each step is logged with its own step number, epoch and tokens seen. The run's last step, a
save, an eval or a stop logs at once, and nothing is left unread however training ends.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field


class Readback:
    """A 1-D tensor's values on the host, read without waiting for GPU work queued after it: on CUDA
    they are copied into pinned memory behind an event, where .item() would wait for the whole stream."""

    def __init__(self, values):
        import torch

        self.event = None
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = values

    def read(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


@dataclass
class _Queued:
    """One logged step whose device values are on their way to the host."""
    step: int
    epoch: float | None
    tokens_seen: int
    steps: int  # optimizer steps the loss sums over (the Trainer's logging interval)
    learning_rate: float
    start_time: float | None
    values: Readback  # the loss sum, [the gradient norm], then each metric's micro-batch values
    grad_norm: float | None  # the norm when the Trainer gave a number, not a tensor
    has_norm: bool
    metric_counts: list[tuple[str, int]] = field(default_factory=list)
    host_metrics: dict = field(default_factory=dict)


class LaggedLogs:
    """Trainer mixin (put it before the Trainer class): logs each step while the next one runs.

    For TRL trainers, whose `log` averages `self._metrics["train"]`: a subclass records its per
    micro-batch metrics with `_step_metric(name, tensor)` and its host-side ones with
    `_host_metric(name, value)`, and they reach `_metrics` with the step they belong to. A subclass
    whose step reads values back itself calls `_stop_lagging()` (the logs are then the Trainer's own).
    """

    lag = True  # class default; False gives the Trainer's own logging (tests compare the two)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._queued: list[_Queued] = []
        self._step_metrics: dict[str, list] = {}
        self._host_metrics: dict = {}
        self._emitting = False
        # Under torchrun the logs gather across ranks: left to the Trainer.
        self._lagging = self.lag and self.accelerator.num_processes == 1

    def _step_metric(self, name: str, value) -> None:
        self._step_metrics.setdefault(name, []).append(value.detach().float().reshape(()))

    def _host_metric(self, name: str, value) -> None:
        self._host_metrics[name] = value

    def _stop_lagging(self) -> None:
        self._lagging = False

    def _track_num_input_tokens(self, inputs):
        # A padding-free batch (one packed row, no attention mask) is all real tokens: its length is
        # known on the host, where the Trainer would count the mask on the GPU and read it back.
        main = getattr(self.model, "main_input_name", "input_ids")
        if self._lagging and self.args.include_num_input_tokens_seen != "no" and main in inputs \
                and "attention_mask" not in inputs and "position_ids" in inputs:
            self.state.num_input_tokens_seen += inputs[main].numel()
            return
        super()._track_num_input_tokens(inputs)

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                 learning_rate=None, **kwargs):
        if self._lagging and self.control.should_log and self.state.global_step > self._globalstep_last_logged:
            self._queue(tr_loss, grad_norm, learning_rate, start_time)
        # Older steps are logged now; this one waits for the next step unless something reads the logs now.
        # Their callbacks may ask to stop or save (the run's Callback does), hence the second look.
        self._log_queued(keep=0 if self._logs_due() else 1)
        if self._queued and self._logs_due():
            self._log_queued(keep=0)
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                         learning_rate=learning_rate, **kwargs)

    def log(self, logs, start_time=None):
        if self._queued and not self._emitting:  # any other log (the run's summary) comes after the steps'
            self._log_queued(keep=0)
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        try:
            result = super().train(*args, **kwargs)
        except BaseException:
            # An interrupt or a failure mid-step still logs the steps that finished, and is what is raised.
            with contextlib.suppress(Exception):
                self._log_queued(keep=0)
            raise
        self._log_queued(keep=0)
        return result

    def _logs_due(self) -> bool:
        control = self.control
        return (not self._lagging or control.should_evaluate or control.should_save or control.should_training_stop
                or self.state.global_step >= self.state.max_steps)

    def _queue(self, tr_loss, grad_norm, learning_rate, start_time) -> None:
        import torch

        values = [tr_loss.detach().float().reshape(1)]
        has_norm = isinstance(grad_norm, torch.Tensor)
        if has_norm:
            values.append(grad_norm.detach().float().reshape(1).to(values[0].device))
        counts = []
        for name, items in self._step_metrics.items():
            values.append(torch.stack(items).to(values[0].device))
            counts.append((name, len(items)))
        flat = torch.cat(values)  # a copy: the Trainer's running loss is zeroed next, in place
        tr_loss -= tr_loss
        self._queued.append(_Queued(
            step=self.state.global_step, epoch=self.state.epoch, tokens_seen=self.state.num_input_tokens_seen,
            steps=self.state.global_step - self._globalstep_last_logged,
            learning_rate=learning_rate if learning_rate is not None else self._get_learning_rate(),
            start_time=start_time, values=Readback(flat), grad_norm=None if has_norm else grad_norm,
            has_norm=has_norm, metric_counts=counts, host_metrics=dict(self._host_metrics)))
        self._step_metrics, self._host_metrics = {}, {}
        self._globalstep_last_logged = self.state.global_step
        self.store_flos()

    def _log_queued(self, keep: int) -> None:
        while len(self._queued) > keep:
            self._log_one(self._queued.pop(0))

    def _log_one(self, queued: _Queued) -> None:
        values = queued.values.read()
        loss_sum, rest = values[0], values[1:]
        logs = {"loss": loss_sum / queued.steps}
        if queued.has_norm:
            logs["grad_norm"], rest = rest[0], rest[1:]
        elif queued.grad_norm is not None:
            logs["grad_norm"] = queued.grad_norm
        logs["learning_rate"] = queued.learning_rate
        metrics = getattr(self, "_metrics", None)
        for name, count in queued.metric_counts:
            if metrics is not None:
                metrics["train"][name].extend(rest[:count])
            rest = rest[count:]
        for name, value in queued.host_metrics.items():
            if metrics is not None:
                metrics["train"][name] = [value]
        self._total_loss_scalar += loss_sum
        # The step's own numbers for the log history and the callbacks (trackers, the live panel).
        state = self.state
        now = state.global_step, state.epoch, state.num_input_tokens_seen
        state.global_step, state.epoch, state.num_input_tokens_seen = queued.step, queued.epoch, queued.tokens_seen
        self._emitting = True
        try:
            self.log(logs, queued.start_time)
        finally:
            self._emitting = False
            state.global_step, state.epoch, state.num_input_tokens_seen = now
