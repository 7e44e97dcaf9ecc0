"""Generation on the resident model, with or without an adapter, streamed piece by piece.

The prompt is the training template's prefix with the user's text in the {prompt} slot, so the
model sees at chat time exactly the tokens it was trained to continue.
"""

from __future__ import annotations

import contextlib
from typing import Callable

from ipylora.engine.config import GenerateArgs
from ipylora.engine.errors import ConfigError


def _streamer(tokenizer, on_text: Callable[[str], None]):
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


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


def generate(model, tokenizer, prompt_text: str, args: GenerateArgs, adapter: str | None,
             on_text: Callable[[str], None] | None = None) -> dict:
    """Generate a continuation of `prompt_text`; returns the text and why it stopped."""
    import torch

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} must be at least 1.")
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature} must be 0 (greedy) or more.")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p {args.top_p} must be in (0, 1].")
    device = next(model.parameters()).device
    inputs = tokenizer(prompt_text, return_tensors="pt").to(device)
    sampling = (dict(do_sample=True, temperature=args.temperature, top_p=args.top_p)
                if args.temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None))
    was_training = model.training
    model.eval()
    try:
        with adapter_context(model, adapter), torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                streamer=_streamer(tokenizer, on_text) if on_text else None,
                **sampling,
            )
    finally:
        model.train(was_training)
    new_tokens = output[0, inputs["input_ids"].shape[1]:].tolist()
    stopped = bool(new_tokens) and new_tokens[-1] == tokenizer.eos_token_id
    return {
        "text": tokenizer.decode(new_tokens, skip_special_tokens=True),
        "tokens": len(new_tokens),
        "stopped_at_eos": stopped,
    }
