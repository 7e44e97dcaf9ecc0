"""Generation on the resident model, with or without an adapter: whole, streamed, or batched.

The prompt is built exactly as training built it: the template's prefix with the user's text in
the {prompt} slot, tokenized with the tokenizer's special tokens (BOS), then the model continues.
A multi-turn conversation repeats the training layout turn after turn (prefix, answer, suffix,
EOS), tokenized piece by piece the way training tokenized prompt and response, so the tokens
of every turn are the ones the adapter saw. An adapter trained with the model's own chat template
(template "model") gets `apply_chat_template` instead.

On CUDA one answer is decoded with the model's decode step captured as a CUDA graph (graphdecode:
3-4x the tokens/s of generate() on a 7B model); elsewhere, and for batches, transformers' generate().
Streaming runs the generation in a worker thread that feeds a `TextIteratorStreamer`; the caller
iterates the pieces in its own thread and can stop the generation at the next token.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from ipylora.engine import graphdecode
from ipylora.engine.config import GenerateArgs
from ipylora.engine.decode import lean_lora
from ipylora.engine.errors import ConfigError

# Template names (run.json "template_name") that mean "the tokenizer's own chat template".
CHAT_TEMPLATE_NAMES = ("model", "chat")


@dataclass(frozen=True)
class PromptFormat:
    """How user turns become prompt tokens: a text template, the model's chat template, or raw text."""

    kind: str
    """"template", "chat" (tokenizer.apply_chat_template) or "raw" (the text as is)."""
    template: object = None
    """The `Template` (prefix/suffix) when kind is "template"."""

    @property
    def label(self) -> str:
        if self.kind == "template":
            return f"template {self.template.name}"
        return {"chat": "the model's chat template", "raw": "raw text"}[self.kind]


def prompt_ids(tokenizer, fmt: PromptFormat, text: str, history: list[tuple[str, str]] = ()) -> list[int]:
    """Token ids for `text` after the earlier (user, answer) turns in `history`."""
    if fmt.kind == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("This tokenizer has no chat template: chat with a text template (train with "
                              "--template human-assistant) or pass --raw.")
        messages = [m for user, answer in history
                    for m in ({"role": "user", "content": user}, {"role": "assistant", "content": answer})]
        messages.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    if fmt.kind == "raw":
        turns = [(user, answer) for user, answer in history]
        texts = [piece for user, answer in turns for piece in (user, answer)]
        return tokenizer("".join(texts) + text, add_special_tokens=True)["input_ids"]
    template = fmt.template
    ids: list[int] = []
    for user, answer in history:
        ids += tokenizer(template.prompt_text(user), add_special_tokens=not ids)["input_ids"]
        ids += tokenizer(answer + template.suffix, add_special_tokens=False)["input_ids"]
        ids.append(tokenizer.eos_token_id)
    ids += tokenizer(template.prompt_text(text), add_special_tokens=not ids)["input_ids"]
    return ids


@contextlib.contextmanager
def adapter_context(model, adapter: str | None):
    """Run the block with `adapter` active, adapters disabled for "base", as it is for None."""
    from peft import PeftModel

    if not isinstance(model, PeftModel) or adapter is None:
        yield model
        return
    if adapter == "base":
        with model.disable_adapter():
            yield model
        return
    previous = model.active_adapter
    model.set_adapter(adapter)
    try:
        yield model
    finally:
        model.set_adapter(previous)


def check_args(args: GenerateArgs) -> None:
    problems = []
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.temperature < 0:
        problems.append(f"--temperature {args.temperature} must be 0 (greedy) or more")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p {args.top_p} must be in (0, 1]")
    if problems:
        raise ConfigError("; ".join(problems) + ".")


def _sampling(args: GenerateArgs) -> dict:
    if args.temperature > 0:
        return dict(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


@contextlib.contextmanager
def _eval_mode(model):
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _callback_streamer(tokenizer, on_text: Callable[[str], None]):
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _result(tokenizer, new_tokens: list[int], started: float, first_token_s: float | None = None) -> dict:
    eos = tokenizer.eos_token_id
    stopped = bool(new_tokens) and new_tokens[-1] == eos
    return {
        "text": tokenizer.decode(new_tokens, skip_special_tokens=True),
        "tokens": len(new_tokens) - int(stopped),
        "stopped_at_eos": stopped,
        "seconds": time.perf_counter() - started,
        "first_token_s": first_token_s,
    }


def _answer_ids(model, tokenizer, ids: list[int], args: GenerateArgs, streamer=None,
                should_stop: Callable[[], bool] | None = None) -> list[int]:
    """The new token ids after prompt `ids`, with the adapter state the caller set (in inference mode).
    On CUDA the decode step is a captured graph (graphdecode); elsewhere transformers' generate()."""
    import torch

    next_token = graphdecode.picker(model, args.temperature, args.top_p) if graphdecode.usable(model) else None
    if next_token is not None:
        if streamer is not None:
            streamer.put(torch.tensor([ids]))  # the prompt, which the streamer skips, as generate() does
        try:
            return graphdecode.decode(
                model, ids, args.max_new_tokens, next_token, tokenizer.eos_token_id,
                on_token=(lambda token: streamer.put(torch.tensor([token]))) if streamer is not None else None,
                should_stop=should_stop or (lambda: False), compiled=args.compile)
        finally:
            if streamer is not None:
                streamer.end()
    criteria = None
    if should_stop is not None:
        from transformers import StoppingCriteria, StoppingCriteriaList

        class StopOnRequest(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), should_stop(), dtype=torch.bool, device=input_ids.device)

        criteria = StoppingCriteriaList([StopOnRequest()])
    input_ids = torch.tensor([ids], device=next(model.parameters()).device)
    output = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=args.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, streamer=streamer,
        stopping_criteria=criteria, **_sampling(args))
    return output[0, len(ids):].tolist()


def generate(model, tokenizer, prompt_text, args: GenerateArgs, adapter: str | None = None,
             on_text: Callable[[str], None] | None = None) -> dict:
    """Continue `prompt_text` (a string, or token ids); returns the text, its length and why it stopped."""
    check_args(args)
    ids = prompt_text if isinstance(prompt_text, list) else tokenizer(prompt_text)["input_ids"]
    started = time.perf_counter()
    with adapter_context(model, adapter), _eval_mode(model), lean_lora(model):
        streamer = _callback_streamer(tokenizer, on_text) if on_text else None
        new_tokens = _answer_ids(model, tokenizer, ids, args, streamer)
    return _result(tokenizer, new_tokens, started)


def generate_batch(model, tokenizer, prompts: list[list[int]], args: GenerateArgs, adapter: str | None = None,
                   batch_size: int = 8) -> list[dict]:
    """Greedy or sampled answers for many prompts (token ids), left-padded in batches."""
    import torch

    check_args(args)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    results = []
    with adapter_context(model, adapter), _eval_mode(model), lean_lora(model):
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
            started = time.perf_counter()
            output = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                    eos_token_id=eos, pad_token_id=pad, **_sampling(args))
            for row in output[:, width:].tolist():
                cut = row.index(eos) + 1 if eos in row else len(row)
                results.append(_result(tokenizer, row[:cut], started))
    return results


class Generation:
    """One generation running in a worker thread; iterate it for text pieces, `stop()` to end it early.

    The worker holds the model until it finishes; `on_done(result)` runs in the worker when it
    does (the session uses it to release the model). `result` is set once the worker is done.
    """

    def __init__(self, model, tokenizer, ids: list[int], args: GenerateArgs, adapter: str | None,
                 on_done: Callable[[dict | None], None] | None = None):
        from transformers import TextIteratorStreamer

        check_args(args)
        self.result: dict | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._first_token_s: float | None = None
        self._args = (model, tokenizer, ids, args, adapter)
        self._on_done = on_done
        self._thread = threading.Thread(target=self._work, name="ipylora-generate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the generation at the next token (the text so far is kept)."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> dict | None:
        self._done.wait(timeout)
        if self.error is not None:
            raise self.error
        return self.result

    def __iter__(self) -> Iterator[str]:
        for piece in self._streamer:
            if piece:
                yield piece

    def _work(self) -> None:
        model, tokenizer, ids, args, adapter = self._args
        started = time.perf_counter()

        def should_stop() -> bool:  # asked after each new token
            if self._first_token_s is None:
                self._first_token_s = time.perf_counter() - started
            return self._stop.is_set()

        try:
            with adapter_context(model, adapter), _eval_mode(model), lean_lora(model):
                new_tokens = _answer_ids(model, tokenizer, ids, args, self._streamer, should_stop)
            self.result = _result(tokenizer, new_tokens, started, self._first_token_s)
            self.result["stopped_by_user"] = self._stop.is_set() and not self.result["stopped_at_eos"]
        except BaseException as exc:  # reported to the reader through wait(); the stream must still end
            self.error = exc
            self._streamer.end()
        finally:
            self._done.set()
            if self._on_done is not None:
                self._on_done(self.result)
