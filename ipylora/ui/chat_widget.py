"""The chat widget of `%lora_chat` with no text: history, input, Send / Stop generation / Clear.

Send starts a generation in the engine's worker thread (`Session.start_chat`); a second thread of
the widget reads its text pieces and updates the reply in place (throttled), so the kernel stays
free: Stop is a button click the kernel handles while the answer streams. Every turn is sent with
the earlier turns of this conversation, formatted as the chosen adapter was trained, after the
system box's text: prefilled with the system prompt the adapter was trained with (emptied: none).
"""

from __future__ import annotations

import html
import threading
import time

import ipywidgets as widgets

from ipylora.engine import GenerateArgs, IpyloraError

BUBBLE = "white-space:pre-wrap;margin:4px 0;padding:6px 8px;border-radius:6px;font-family:inherit"
USER = BUBBLE + ";background:#eef3fb"
MODEL = BUBBLE + ";background:#f4f4f4"


def _message(who: str, text: str, style: str, note: str = "") -> str:
    note_html = f"<div style='color:#888;font-size:85%'>{html.escape(note)}</div>" if note else ""
    return f"<div style='{style}'><b>{html.escape(who)}</b><br>{html.escape(text)}{note_html}</div>"


class ChatWidget:
    """A multi-turn chat with the resident model; displays itself in a notebook."""

    def __init__(self, session, args: GenerateArgs = GenerateArgs(), update_every_s: float = 0.05):
        self.session = session
        self.update_every_s = update_every_s
        self.history: list[tuple[str, str]] = []
        self.generation = None
        self._reader: threading.Thread | None = None
        self._turns_html: list[str] = []

        self.adapter = widgets.Dropdown(description="adapter", options=self._adapter_options(),
                                        value=self._default_adapter(args.adapter))
        self.temperature = widgets.BoundedFloatText(value=args.temperature, min=0, max=5, step=0.1,
                                                    description="temperature")
        self.top_p = widgets.BoundedFloatText(value=args.top_p, min=0.01, max=1, step=0.05, description="top-p")
        self.max_new_tokens = widgets.BoundedIntText(value=args.max_new_tokens, min=1, max=1_000_000,
                                                     description="max tokens")
        # torch.compile of the captured decode step: faster tokens after a one-time compile.
        self.compile = widgets.Checkbox(value=args.compile, description="compile (CUDA)", indent=False,
                                        disabled=not _cuda_available())
        # The system prompt sent before the conversation; it follows the adapter menu until edited.
        self.system = widgets.Textarea(description="system", placeholder="(no system prompt)",
                                       layout=widgets.Layout(width="100%", height="3em"))
        self.system_note = widgets.HTML()
        self._default_system = None
        self._prefill_system()
        self.adapter.observe(lambda _: self._prefill_system(), names="value")
        self.transcript = widgets.HTML()
        self.reply = widgets.HTML()
        self.input = widgets.Textarea(placeholder="Message", layout=widgets.Layout(width="100%", height="4em"))
        self.send_button = widgets.Button(description="Send", button_style="primary", icon="paper-plane")
        self.stop_button = widgets.Button(description="Stop generation", icon="stop", disabled=True)
        self.clear_button = widgets.Button(description="Clear", icon="trash")
        self.status = widgets.HTML()
        self.send_button.on_click(lambda _: self.send())
        self.stop_button.on_click(lambda _: self.stop())
        self.clear_button.on_click(lambda _: self.clear())
        self.root = widgets.VBox([
            widgets.HBox([self.adapter, self.temperature, self.top_p, self.max_new_tokens, self.compile]),
            self.system, self.system_note,
            widgets.VBox([self.transcript, self.reply], layout=widgets.Layout(max_height="32em", overflow="auto")),
            self.input,
            widgets.HBox([self.send_button, self.stop_button, self.clear_button, self.status]),
        ])
        session.add_listener(self._refresh_adapters)

    # -- display -----------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs):
        return self.root._repr_mimebundle_(**kwargs)

    def close(self) -> None:
        self.session.remove_listener(self._refresh_adapters)
        self.root.close()

    # -- actions -----------------------------------------------------------------------------
    def send(self, text: str | None = None):
        """Send the input box's text (or `text`); the answer streams into the reply area."""
        text = (self.input.value if text is None else text).strip()
        if not text or self.busy:
            return None
        args = GenerateArgs(adapter=self.adapter.value, max_new_tokens=self.max_new_tokens.value,
                            temperature=self.temperature.value, top_p=self.top_p.value, compile=self.compile.value)
        try:
            generation = self.session.start_chat(text, args, history=list(self.history), system=self.system.value)
        except IpyloraError as exc:
            self._set_status(str(exc), error=True)
            return None
        self.generation = generation
        self.input.value = ""
        self.send_button.disabled, self.stop_button.disabled, self.clear_button.disabled = True, False, True
        self._set_status(f"generating with {args.adapter} …")
        self.reply.value = _message("you", text, USER) + _message(args.adapter, "", MODEL)
        self._reader = threading.Thread(target=self._read, args=(generation, text, args), daemon=True,
                                        name="ipylora-chat-widget")
        self._reader.start()
        return generation

    def stop(self) -> None:
        """End the answer being generated at the next token (what came so far is kept)."""
        if self.generation is not None:
            self.generation.stop()

    def clear(self) -> None:
        """Forget the conversation (not while an answer streams)."""
        if self.busy:
            return
        self.history.clear()
        self._turns_html.clear()
        self.transcript.value = self.reply.value = ""
        self._set_status("")

    @property
    def busy(self) -> bool:
        return self._reader is not None and self._reader.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the current answer is complete (for scripts and tests)."""
        if self._reader is not None:
            self._reader.join(timeout)

    # -- the reader thread -------------------------------------------------------------------
    def _read(self, generation, text: str, args: GenerateArgs) -> None:
        user = _message("you", text, USER)
        answer, last = "", 0.0
        try:
            for piece in generation:
                answer += piece
                now = time.monotonic()
                if now - last >= self.update_every_s:
                    self.reply.value = user + _message(args.adapter, answer, MODEL)
                    last = now
            result = generation.wait()
        except Exception as exc:  # shown in the widget: a thread has nobody to raise to
            self._finish(text, answer, args, f"error: {type(exc).__name__}: {exc}", error=True)
            return
        if result["stopped_at_eos"]:
            why = "stopped at EOS"
        elif result.get("stopped_by_user"):
            why = "stopped by you"
        else:
            why = f"reached max tokens ({args.max_new_tokens})"
        speed = result["tokens"] / result["seconds"] if result["seconds"] > 0 else 0.0
        self._finish(text, result["text"], args, f"{result['tokens']} tokens · {speed:,.0f} tok/s · {why}")

    def _finish(self, text: str, answer: str, args: GenerateArgs, note: str, error: bool = False) -> None:
        self.history.append((text, answer))
        self._turns_html.append(_message("you", text, USER) + _message(args.adapter, answer, MODEL, note))
        self.transcript.value = "".join(self._turns_html)
        self.reply.value = ""
        self._set_status(note, error=error)
        self.send_button.disabled, self.stop_button.disabled, self.clear_button.disabled = False, True, False

    def _set_status(self, text: str, error: bool = False) -> None:
        color = "#b00020" if error else "#666"
        self.status.value = f"<span style='color:{color}'>{html.escape(text)}</span>"

    # -- system prompt -----------------------------------------------------------------------
    def _prefill_system(self) -> None:
        """Put the chosen adapter's trained system prompt in the box, unless the user edited the box."""
        try:
            choice = self.session.system_prompt(self.adapter.value)
        except IpyloraError as exc:
            self.system_note.value = f"<span style='color:#b00020'>{html.escape(str(exc))}</span>"
            return
        if self._default_system is None or self.system.value == self._default_system:
            self.system.value = choice.text or ""
        self._default_system = choice.text or ""
        note = f"{choice.note} — edit the box to choose another (empty: none)" if choice.note else ""
        self.system_note.value = f"<span style='color:#888;font-size:85%'>{html.escape(note)}</span>"

    # -- adapters ----------------------------------------------------------------------------
    def _adapter_options(self) -> list[str]:
        return ["base", *self.session.adapters]

    def _default_adapter(self, requested: str | None) -> str:
        choice = requested or self.session.active_adapter or "base"
        return choice if choice in self._adapter_options() else "base"

    def _refresh_adapters(self) -> None:
        options = self._adapter_options()
        if list(self.adapter.options) != options:
            current = self.adapter.value
            self.adapter.options = options
            self.adapter.value = current if current in options else self._default_adapter(None)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
