"""Talking to the resident model: the prompt an adapter is sent, its system prompt, chat, compare.

Every prompt is built the way the adapter's training built its rows: its template (run.json), the
system prompt its rows shared (or the most common one, said in a note), the earlier turns, the
user's text, tokenized through the training path (`chat.prompt_ids`). Each function takes the
`Session`; the session's lock is held while the model generates (training and other chats wait).
"""

from __future__ import annotations

from pathlib import Path

from ipylora.engine import chat as chat_module
from ipylora.engine.adapters import Adapter
from ipylora.engine.config import GenerateArgs
from ipylora.engine.errors import ConfigError
from ipylora.engine.templates import get_template


def chat(session, text: str, args: GenerateArgs = GenerateArgs(), on_text=None, raw: bool = False,
         history: list[tuple[str, str]] = (), system: str | None = None) -> dict:
    """Answer `text`, after the (user, answer) turns in `history`, with the active adapter (or
    `args.adapter`; "base" for none), in the prompt format it was trained with. `system`: the
    system prompt; None sends the one the adapter was trained with (`system_prompt`), "" none."""
    _check_raw(raw, system)
    with session._holding_model():
        adapter, ids = _chat_ids(session, text, args, raw, history, system)
        return chat_module.generate(session.model, session.tokenizer, ids, args, adapter, on_text)


def start_chat(session, text: str, args: GenerateArgs = GenerateArgs(), history: list[tuple[str, str]] = (),
               raw: bool = False, system: str | None = None) -> chat_module.Generation:
    """Like `chat`, but generating in a worker thread: iterate the result for text pieces, `stop()` it.

    The model stays reserved (training and other chats refuse) until the generation ends.
    """
    _check_raw(raw, system)
    session._reserve_model()
    try:
        adapter, ids = _chat_ids(session, text, args, raw, history, system)
        return chat_module.Generation(session.model, session.tokenizer, ids, args, adapter,
                                      on_done=lambda result: session._busy.release())
    except BaseException:
        session._busy.release()
        raise


def _chat_ids(session, text: str, args: GenerateArgs, raw: bool, history, system: str | None) -> tuple[str, list[int]]:
    """(adapter, prompt token ids) for one chat turn."""
    adapter = session._chat_adapter(args.adapter)
    if system is None:
        system = None if raw else system_prompt(session, adapter).text
    fmt = prompt_format(session, adapter, raw)
    return adapter, chat_module.prompt_ids(session.tokenizer, fmt, text, history, system)


def system_prompt(session, adapter: str | None = None) -> chat_module.SystemPrompt:
    """The system prompt chat sends `adapter` (None: the active one; "base": none) by default: the one
    its training rows shared (run.json), or the most common with a note saying so. The base uses
    the latest dataset's, as it uses that dataset's template."""
    adapter = session._chat_adapter(adapter)
    if adapter == "base":
        if not session.datasets:
            return chat_module.SystemPrompt(None)
        dataset = list(session.datasets.values())[-1]
        return chat_module.trained_system(dataset.system_summary(), dataset.system_prompts())
    summary, name = _trained_system(session.adapter(adapter))
    known = session.datasets.get(name)
    prompts = known.system_prompts() if known is not None else None
    if prompts is not None and known.system_summary() != {k: summary.get(k) for k in known.system_summary()}:
        prompts = None  # the dataset of that name changed since: its counts are not the adapter's
    return chat_module.trained_system(summary, prompts)


def prompt_format(session, adapter: str, raw: bool = False) -> chat_module.PromptFormat:
    """How prompts for `adapter` ("base": none) are built: its training template (run.json), the
    model's chat template, or raw text. The base uses the latest dataset's template, else the
    tokenizer's chat template (chat models), else none."""
    PromptFormat = chat_module.PromptFormat
    if raw:
        return PromptFormat("raw")
    if adapter != "base":
        template_name, source, dataset = _trained_template(session.adapter(adapter))
        if template_name in chat_module.CHAT_TEMPLATE_NAMES:
            return PromptFormat("chat")
        known = session.datasets.get(dataset)
        if known is not None and getattr(known.template, "source", None) == source:
            return PromptFormat("template", known.template)
        return PromptFormat("template", get_template(source))
    if session.datasets:  # the base answers in the format the user is about to train on
        template = list(session.datasets.values())[-1].template
        if template.name in chat_module.CHAT_TEMPLATE_NAMES:
            return PromptFormat("chat")
        return PromptFormat("template", template)
    if session.tokenizer is not None and getattr(session.tokenizer, "chat_template", None):
        return PromptFormat("chat")
    return PromptFormat("template", get_template("plain"))


def compare(session, prompts: list, adapters: list[str], args: GenerateArgs = GenerateArgs(),
            system: str | None = None) -> dict:
    """Each adapter's ("base": none) answer to each prompt, all on the one resident model.

    A prompt is a user text, sent under each adapter's trained system prompt (`system_prompt`),
    or a conversation's prompt side as messages (`Example.messages`: system, earlier turns, the
    last user turn), formatted in each adapter's own template. `system` replaces the system
    prompt of both ("" removes it). The result's "prompts" are the last user turns.
    """
    if not prompts:
        raise ConfigError("Nothing to compare: give a prompt, or --prompts-from DATASET.")
    adapters = list(dict.fromkeys(adapters))
    answers, notes = {}, []
    with session._holding_model():
        for name in adapters:
            session._chat_adapter(name)
        for name in adapters:
            fmt = prompt_format(session, name)
            default = system_prompt(session, name) if system is None else chat_module.SystemPrompt(system)
            if default.note and any(isinstance(p, str) for p in prompts):
                notes.append(f"{name}: {default.note}")
            conversations = [_compare_messages(p, default.text, system) for p in prompts]
            ids = [chat_module.conversation_ids(session.tokenizer, fmt, messages) for messages in conversations]
            answers[name] = chat_module.generate_batch(session.model, session.tokenizer, ids, args, name)
    return {"prompts": [_last_user(p) for p in prompts], "context": [_context(p) for p in prompts],
            "adapters": adapters, "answers": answers, "notes": notes}


def _trained_template(adapter: Adapter) -> tuple[str, str, str]:
    """(template name, template source, dataset name) the adapter was trained with, from its run.json."""
    from ipylora.engine.runs import read_json

    path = Path(adapter.run_dir) / "run.json"
    data = read_json(path).get("dataset", {}) if path.exists() else {}
    return data.get("template_name", "custom"), data.get("template", adapter.template), data.get("name", adapter.dataset)


def _trained_system(adapter: Adapter) -> tuple[dict, str]:
    """(run.json's dataset record, dataset name) of the adapter: its system prompt summary."""
    from ipylora.engine.runs import read_json

    path = Path(adapter.run_dir) / "run.json"
    data = read_json(path).get("dataset", {}) if path.exists() else {}
    return data, data.get("name", adapter.dataset)


def _check_raw(raw: bool, system: str | None) -> None:
    if raw and system:
        raise ConfigError("--raw sends the text as is, without the template a system prompt goes into: "
                          "drop --system, or drop --raw.")


def _compare_messages(prompt, default_system: str | None, system: str | None) -> list[dict]:
    """A compare prompt as messages: a text under the default system prompt, or a row's prompt side
    (its own system turn unless `system` replaces it)."""
    if isinstance(prompt, str):
        return chat_module.chat_messages(prompt, system=default_system)
    return list(prompt) if system is None else chat_module.with_system(list(prompt), system)


def _last_user(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else ""


def _context(prompt) -> str:
    """What a row's prompt side holds besides its last user turn ("" for a text prompt)."""
    if isinstance(prompt, str):
        return ""
    parts = ["system prompt"] if any(m["role"] == "system" for m in prompt) else []
    earlier = sum(m["role"] == "assistant" for m in prompt)
    if earlier:
        parts.append(f"{earlier} earlier turn{'s' if earlier > 1 else ''}")
    return " + ".join(parts)
