"""Generation on the resident model, with or without an adapter: whole, streamed, or batched.

The prompt is built exactly as training built it. A chat turn becomes messages (the system prompt
the adapter was trained with, the earlier user/answer turns, the new user text), the adapter's
template turns them into spans (`Template.prompt_segments`), and the spans are tokenized by the
training tokenizer path (`data.tokenize_segments`: the first span with the tokenizer's special
tokens, EOS after each answer), so the tokens of every turn, system prompt included, are the ones
the adapter saw. An adapter trained with the model's own chat template (template "model") gets
`apply_chat_template` over the same messages instead.

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
from ipylora.engine.decode import forwards, lean_lora
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


@dataclass(frozen=True)
class SystemPrompt:
    """The system prompt a chat sends by default, and a note when training rows did not all share it."""

    text: str | None
    """The system message ("" or None: none)."""
    note: str = ""
    """Which one it is, when the training rows did not all share it ("" when they did); the front
    end adds how to choose another (--system, the widget's box)."""


def trained_system(summary: dict, prompts: list[str] | None = None) -> SystemPrompt:
    """The default system prompt from run.json's dataset record (`LoraDataset.system_summary()`).

    `prompts` (every training row's system prompt, "" for none) adds the counts to the note when
    the rows varied; without them (the dataset is gone from the session) the note says less.
    """
    system = summary.get("system")
    if not system or summary.get("system_shared", True):
        return SystemPrompt(system or None)
    shown = repr(system if len(system) <= 60 else system[:60] + "…")
    if not prompts or prompts.count(system) == 0:
        return SystemPrompt(system, f"system prompt: the most common in training ({summary.get('system_distinct')} "
                                    f"different, counting none): {shown}")
    used, rows, without = prompts.count(system), len(prompts), prompts.count("")
    others = len(set(prompts) - {"", system})
    which = f"the most common of {others + 1} in training" if others else "the one the training rows had"
    counts = f"{used} of {rows} rows" + (f"; {without} had none" if without else "")
    return SystemPrompt(system, f"system prompt: {which} ({counts}): {shown}")


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """`messages` with its system turns replaced by `system` ("" or None: no system turn)."""
    rest = [dict(m) for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": system}, *rest] if system else rest


def chat_messages(text: str, history: list[tuple[str, str]] = (), system: str | None = None) -> list[dict]:
    """[system?, (user, assistant) per earlier turn..., user] as role/content messages."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, answer in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return [*messages, {"role": "user", "content": text}]


def prompt_ids(tokenizer, fmt: PromptFormat, text: str, history: list[tuple[str, str]] = (),
               system: str | None = None) -> list[int]:
    """Token ids for `text` after the earlier (user, answer) turns in `history`, under `system`."""
    return conversation_ids(tokenizer, fmt, chat_messages(text, history, system))


def conversation_ids(tokenizer, fmt: PromptFormat, messages: list[dict]) -> list[int]:
    """Token ids for a conversation that ends with a user turn, up to where the answer starts."""
    if fmt.kind == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("This tokenizer has no chat template: chat with a text template (train with "
                              "--template human-assistant) or pass --raw.")
        ids = _model_template_ids(tokenizer, messages)
        if ids is not None:
            return ids
        try:
            ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # jinja errors raised by the model's own template (e.g. "no system role")
            if any(m["role"] == "system" for m in messages):
                raise ConfigError(f"The model's chat template refused this conversation ({exc}): chat with "
                                  "--system none, or train with --template chatml.") from None
            raise ConfigError(f"The model's chat template refused this conversation ({exc}): use --raw, "
                              "or train with --template chatml.") from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    if fmt.kind == "raw":
        return tokenizer("".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]
    return template_prompt_ids(tokenizer, fmt.template, messages)


def _model_template_ids(tokenizer, messages) -> list[int] | None:
    """The prompt as `--template model` training tokenized it (span by span, the tokenizer's own BOS),
    or None where the template refuses the conversation (the caller then says why).

    apply_chat_template(tokenize=True) adds no BOS, so a template that does not write BOS itself
    (ChatML, "User:/Assistant:" layouts) sent chat one token shorter than every trained row: GPT-2
    and OPT, whose positions are learned, then answered 0/12 pairs they had memorised (model matrix).
    """
    from ipylora.engine.errors import DatasetError
    from ipylora.engine.templates import MODEL

    try:
        return template_prompt_ids(tokenizer, MODEL.resolve(tokenizer), messages)
    except (ConfigError, DatasetError):
        return None


def template_prompt_ids(tokenizer, template, messages: list[dict]) -> list[int]:
    """The prompt side of `messages` in `template`, tokenized span by span as training tokenized it."""
    from ipylora.engine.data import tokenize_segments

    segments = template.prompt_segments(list(messages))
    # No length limit: training's --max-length cut is for rows with an answer; a prompt is sent whole.
    return list(tokenize_segments([segments], tokenizer, max_length=1 << 62)["input_ids"][0])


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
    """Inference mode, and no MoE router logits: TRL's trainer turns `output_router_logits` on for its
    load-balancing loss and leaves it on, and transformers then computes that loss inside a padded
    batched generate() with a mask as long as the whole sequence: Mixtral/Qwen3-MoE eval crashed."""
    import torch

    was_training = model.training
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    router = getattr(config, "output_router_logits", None)
    model.eval()
    if router:
        config.output_router_logits = False
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)
        if router:
            config.output_router_logits = router


def _callback_streamer(tokenizer, on_text: Callable[[str], None]):
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def stop_ids(model, tokenizer) -> list[int]:
    """The tokens an answer ends at: EOS and the end-of-turn ids of the model's generation config.

    Chat models list their end-of-turn token there (Gemma's <end_of_turn>, Llama 3's <|eot_id|>,
    Qwen's <|im_end|>) and generate() stops at them; training under `--template model` trains that
    token and EOS after it, so an answer ends at whichever comes first, as a plain generate() does.
    """
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    configured = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, (list, tuple)) else [configured]
    return list(dict.fromkeys(i for i in (tokenizer.eos_token_id, *configured) if i is not None))


def _result(tokenizer, new_tokens: list[int], started: float, first_token_s: float | None = None,
            stops: list[int] | None = None) -> dict:
    stops = stops if stops is not None else [tokenizer.eos_token_id]
    stopped = bool(new_tokens) and new_tokens[-1] in stops
    return {
        "text": tokenizer.decode(new_tokens, skip_special_tokens=True),
        "tokens": len(new_tokens) - int(stopped),
        "stopped_at_eos": stopped,
        "stop_token": new_tokens[-1] if stopped else None,
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
        _fused_kernels(model, args.compile)
        if streamer is not None:
            streamer.put(torch.tensor([ids]))  # the prompt, which the streamer skips, as generate() does
        try:
            with _merged_copies(model) if not _four_bit(model) else contextlib.nullcontext():
                return graphdecode.decode(
                    model, ids, args.max_new_tokens, next_token, stop_ids(model, tokenizer),
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
        eos_token_id=stop_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id, streamer=streamer,
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
    return _result(tokenizer, new_tokens, started, stops=stop_ids(model, tokenizer))


def generate_batch(model, tokenizer, prompts: list[list[int]], args: GenerateArgs, adapter: str | None = None,
                   batch_size: int = 8) -> list[dict]:
    """Greedy or sampled answers for many prompts (token ids), left-padded in batches.

    On CUDA the prompts are decoded graphdecode.BATCH_ROWS at a time through one captured step
    (graphdecode.decode_batch; shortest prompts together, so that little is padding), the adapter
    merged into copies of the weights where free memory allows (`_merged_copies`, chat's: the step
    and the copies are kept for the next call); if that runs out of memory, unmerged; elsewhere, or
    if that runs out too, by transformers' generate() `batch_size` at a time."""
    import torch

    check_args(args)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_ids(model, tokenizer)
    with adapter_context(model, adapter), _eval_mode(model), lean_lora(model):
        next_token = graphdecode.picker(model, args.temperature, args.top_p) if graphdecode.usable(model) else None
        if next_token is not None:
            _fused_kernels(model, args.compile)
        for merge in (True, False) if next_token is not None else ():
            try:
                with _merged_copies(model) if merge else contextlib.nullcontext():
                    return _decode_batches(model, tokenizer, prompts, args, next_token, pad, stops)
            except torch.cuda.OutOfMemoryError:
                graphdecode.release(model)
        results = []
        device = next(model.parameters()).device
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
            started = time.perf_counter()
            output = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                    eos_token_id=stops, pad_token_id=pad, **_sampling(args))
            for row in output[:, width:].tolist():
                cut = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
                results.append(_result(tokenizer, row[:cut], started, stops=stops))
    return results


def _fused_kernels(model, compiled: bool) -> None:
    """Liger's RMSNorm, RoPE and SwiGLU kernels on the resident model for a captured decode step, as
    a training run on the GPU applies them (once per base model; where Liger is installed and knows
    the architecture). 7B shape, r16 adapter, H200: 145.9 -> 186.6 tokens/s (bench/RESULTS.md,
    session 12). Not for --compile, whose step is compiled whole (fullgraph), nor off CUDA (Liger's
    kernels are Triton's: a CPU model would fail on them, and keep them on its instance)."""
    if not compiled and _is_cuda(model):
        from ipylora.engine.models import base_of
        from ipylora.engine.speed import _liger_once

        _liger_once(base_of(model), [])


def _is_cuda(model) -> bool:
    return next(model.parameters()).is_cuda


def _merged_copies(model):
    """Chat's and batched decoding's steps on the adapter merged into copies of the weights
    (graphdecode.held_copies, within half the free GPU memory): the step then reads what the base
    model's reads, with nothing more a layer for the adapter (7B shape, H200, session 12: 204
    tokens/s for the base against 187 with an unmerged r16 adapter). Kept across turns and calls
    while the adapter state is the same; training frees them with the steps. Layers the budget
    leaves out stay unmerged; 4-bit bases are dequantized into their copies (batched decoding only:
    chat's one-row step on a 4-bit base keeps bitsandbytes' kernels, `_four_bit`)."""
    return forwards(graphdecode.held_copies(model, lambda: _merge_budget(model)))


def _four_bit(model) -> bool:
    """Whether bitsandbytes holds the model's layers in 4 bits. Chat's one-row step then runs over the
    nf4 codes (lean_lora's forwards over gemv's kernel for a repacked copy of the codes, gemv.nf4_spec,
    q/k/v and gate/up stacked, gemv.nf4_stack: 276 tokens/s for the 7B shape with an r16 adapter on an
    H200, session 22; bitsandbytes' own kernel where that copy does not fit) instead of bf16 merged copies, which take 4x the weights' memory and
    decoded at bitsandbytes' speed (session 14: 166-170 tokens/s against 169-173). Batched decoding
    still merges into copies (a 64-row step reads each weight once for all rows, where bitsandbytes
    dequantizes it first)."""
    return any(type(module).__name__ == "Linear4bit" for module in model.modules())


def _merge_budget(model) -> int:
    """Bytes of merged weight copies a batched decode may make: half of the GPU memory not in use
    (free, and cached by torch but unallocated); the rest is for the batch cache and activations."""
    from ipylora.engine.speed import _free_bytes

    return _free_bytes() // 2 if _is_cuda(model) else 0


def _decode_batches(model, tokenizer, prompts, args: GenerateArgs, next_token, pad: int, stops) -> list[dict]:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    found = {}
    for start in range(0, len(order), graphdecode.BATCH_ROWS):
        chunk = order[start:start + graphdecode.BATCH_ROWS]
        started = time.perf_counter()
        answers = graphdecode.decode_batch(model, [prompts[i] for i in chunk], pad, args.max_new_tokens, next_token,
                                           stops, compiled=args.compile)
        for i, new in zip(chunk, answers):
            found[i] = _result(tokenizer, new, started, stops=stops)
    return [found[i] for i in range(len(prompts))]


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
            self.result = _result(tokenizer, new_tokens, started, self._first_token_s, stop_ids(model, tokenizer))
            self.result["stopped_by_user"] = self._stop.is_set() and not self.result["stopped_at_eos"]
        except BaseException as exc:  # reported to the reader through wait(); the stream must still end
            self.error = exc
            self._streamer.end()
        finally:
            self._done.set()
            if self._on_done is not None:
                self._on_done(self.result)
