"""Templates turn a conversation into text, split into spans that do or do not carry loss.

`segments(messages)` returns `[(text, trained), ...]`, always starting with an untrained span:
every user/system turn and the template's wrapping around it are untrained, each assistant
turn (with the template's end-of-turn text) is trained, and the tokenizer step appends EOS after
each trained span. At chat time `prompt_text(text)` is the same untrained prefix with the user's
text in it, so the model sees exactly the tokens it was trained to continue.

Three kinds:
- format strings with one `{prompt}` and one `{response}` (`human-assistant`, `alpaca`, custom);
- Jinja chat templates over `messages`, the convention of Hugging Face chat templates (`chatml`,
  a `.jinja` file); spans come from rendering the conversation turn by turn;
- `model`: the base tokenizer's own chat template through `apply_chat_template`. It needs the
  tokenizer, so `resolve(tokenizer)` turns it into a Jinja template whose `source` carries the
  chat template and the special tokens: chat rebuilds it from run.json without the tokenizer.

Templates are registered in the `ipylora.templates` entry-point group.
"""

from __future__ import annotations

import difflib
import json
import re
from functools import lru_cache
from pathlib import Path

from ipylora.engine import plugins
from ipylora.engine.errors import ConfigError, DatasetError

Segments = list[tuple[str, bool]]

_HEADER = re.compile(r"^\{#- ipylora (?P<meta>\{.*?\}) -#\}\n", re.S)


class Template:
    """Base: a named way of writing conversations as text."""

    name: str = "template"
    source: str = ""
    needs_tokenizer = False

    def resolve(self, tokenizer) -> Template:
        """The template to use with this tokenizer (itself unless it depends on the model)."""
        return self

    def segments(self, messages: list[dict]) -> Segments:
        raise NotImplementedError

    def prompt_text(self, prompt: str, tokenizer=None) -> str:
        """The text that precedes the response, with `prompt` as the user's turn."""
        raise NotImplementedError

    def prompt_segments(self, messages: list[dict]) -> Segments:
        """Spans for a conversation that ends with a user turn, up to where the answer starts:
        multi-turn chat tokenizes these exactly as training did (`data.tokenize_segments`)."""
        return self.segments([*messages, {"role": "assistant", "content": ""}])[:-1]

    def render(self, prompt: str, response: str) -> tuple[str, str]:
        """(prompt side, response side) of a single-turn example."""
        segs = self.segments([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
        return "".join(t for t, trained in segs if not trained), "".join(t for t, trained in segs if trained)


class FormatTemplate(Template):
    """A string with one {prompt} and one {response}; what follows {response} is trained with it."""

    def __init__(self, name: str, source: str):
        extra = sorted(set(re.findall(r"(?<!\{)\{(\w*)\}(?!\})", source)) - {"prompt", "response"})
        if extra:
            raise ConfigError(
                f"--template {source!r} uses {{{extra[0]}}}: a template only has {{prompt}} and {{response}}. "
                f"Put columns into them with --prompt \"...{{{extra[0]}}}...\" or --columns prompt={extra[0]}."
            )
        if source.count("{response}") != 1 or source.count("{prompt}") != 1:
            raise ConfigError(_unknown_message(source))
        prefix, suffix = source.split("{response}")
        if "{prompt}" not in prefix:
            raise ConfigError(f"--template {name!r} puts {{prompt}} after {{response}}: the prompt must come first.")
        self.name, self.source, self.prefix, self.suffix = name, source, prefix, suffix
        # Whitespace after the end-of-turn text is not trained: chat stops at EOS before it.
        self._trained_suffix = suffix.rstrip()
        self._tail = suffix[len(self._trained_suffix):]

    def prompt_text(self, prompt: str, tokenizer=None) -> str:
        return self.prefix.replace("{prompt}", prompt)

    def render(self, prompt: str, response: str) -> tuple[str, str]:
        return self.prompt_text(prompt), response + self.suffix

    def segments(self, messages: list[dict]) -> Segments:
        segs: Segments = []
        users: list[str] = []
        tail = ""
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "assistant":
                segs.append((tail + self.prefix.replace("{prompt}", "\n\n".join(users)), False))
                segs.append((content + self._trained_suffix, True))
                users, tail = [], self._tail
            else:  # system and user turns go into the next prompt slot
                users.append(content)
        return segs or [("", False)]


class ChatTemplate(Template):
    """A Jinja template over `messages`, as Hugging Face chat templates are written."""

    def __init__(self, name: str, source: str, bos_token: str = "", eos_token: str = "", strip_bos: bool = False):
        self.name, self.source = name, source
        self.bos_token, self.eos_token, self.strip_bos = bos_token, eos_token, strip_bos
        self._compiled = _compile(source, name)

    def render_messages(self, messages: list[dict], add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as exc:
            raise DatasetError(f"The {self.name} template failed on a conversation: {exc}. Fix the template "
                               "or the data it rejects.") from None

    def prompt_text(self, prompt: str, tokenizer=None) -> str:
        text = self.render_messages([{"role": "user", "content": prompt}], True)
        return text[len(self.bos_token):] if self.strip_bos and text.startswith(self.bos_token) else text

    def segments(self, messages: list[dict]) -> Segments:
        segs: Segments = []
        done = ""
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render_messages(messages[:k], True)
            after = self.render_messages(messages[: k + 1], False)
            if not (before.startswith(done) and after.startswith(before)):
                raise DatasetError(
                    f"The {self.name} template rewrites earlier turns when a turn is added, so the trained "
                    "turns cannot be told apart: use --template chatml, or single-turn rows."
                )
            turn = after[len(before):]
            trained = turn.rstrip()
            segs.append((before[len(done):], False))
            segs.append((trained, True))
            done = before + trained
        if segs and self.strip_bos and segs[0][0].startswith(self.bos_token):
            segs[0] = (segs[0][0][len(self.bos_token):], False)
        return segs or [("", False)]


class ModelTemplate(Template):
    """The base model's own chat template (tokenizer.apply_chat_template)."""

    name = "model"
    source = "model"
    needs_tokenizer = True

    def resolve(self, tokenizer) -> Template:
        if tokenizer is None:
            raise ConfigError("--template model uses the base model's chat template: load the model first.")
        chat_template = getattr(tokenizer, "chat_template", None)
        if not chat_template or not isinstance(chat_template, str):
            model = getattr(tokenizer, "name_or_path", "") or "this model"
            raise ConfigError(f"--template model: the tokenizer of {model} has no chat template. Use --template "
                              "chatml or human-assistant, or train with a model that has one (--model ...).")
        return _resolved_model_template(tokenizer, chat_template)

    def segments(self, messages):
        raise ConfigError("--template model needs the tokenizer: call tokenize(tokenizer, ...) first.")

    def prompt_text(self, prompt: str, tokenizer=None) -> str:
        return self.resolve(tokenizer).prompt_text(prompt)


class TokenizerChatTemplate(ChatTemplate):
    """`model` resolved against a tokenizer: renders with its apply_chat_template."""

    def __init__(self, tokenizer, source: str, meta: dict):
        super().__init__("model", source, meta["bos_token"], meta["eos_token"], meta["strip_bos"])
        self._tokenizer = tokenizer

    def render_messages(self, messages, add_generation_prompt):
        try:
            return self._tokenizer.apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja errors raised by the model's own template
            raise DatasetError(f"The model's chat template failed on a conversation: {exc}. Use --template chatml "
                               "or fix the data it rejects.") from None


def _resolved_model_template(tokenizer, chat_template: str) -> Template:
    meta = {
        "template": "model", "model": getattr(tokenizer, "name_or_path", ""),
        "bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or "",
        "strip_bos": bool(tokenizer.bos_token) and tokenizer.bos_token_id in tokenizer("")["input_ids"],
    }
    sets = "".join(f"{{%- set {k} = {json.dumps(meta[k])} -%}}" for k in ("bos_token", "eos_token"))
    source = "{#- ipylora " + json.dumps(meta) + " -#}\n" + sets + chat_template
    return TokenizerChatTemplate(tokenizer, source, meta)


@lru_cache(maxsize=32)
def _compile(source: str, name: str):
    """Compile like transformers compiles chat templates (sandboxed, trim/lstrip blocks, loop controls)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers) renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"--template {name!r}: Jinja syntax error on line {exc.lineno}: {exc.message}. "
                          "Fix the template.") from None


HUMAN_ASSISTANT = FormatTemplate("human-assistant", "###Human:\n{prompt}\n\n### Assistant:\n{response}")  # the seed's, byte for byte
ALPACA = FormatTemplate("alpaca", (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n{response}"
))
PLAIN = FormatTemplate("plain", "{prompt}{response}")  # no wrapping at all
CHATML = ChatTemplate("chatml", (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
))
MODEL = ModelTemplate()


def get_template(spec: str) -> Template:
    """A registered template by name, a format string, Jinja text, a .jinja file, or a recorded source."""
    obj = plugins.get(plugins.TEMPLATES, spec) if re.fullmatch(r"[\w.:-]+", spec) else None
    if obj is not None:
        return _as_template(obj, spec)
    match = _HEADER.match(spec)
    if match:  # a resolved `model` template, as recorded in run.json
        meta = json.loads(match.group("meta"))
        return ChatTemplate(meta.get("template", "model"), spec, meta["bos_token"], meta["eos_token"], meta["strip_bos"])
    if "{prompt}" in spec or "{response}" in spec:
        return FormatTemplate("custom", spec)
    if "{%" in spec or "{{" in spec:
        return ChatTemplate("jinja", spec)
    path = Path(spec).expanduser()
    if path.suffix in (".jinja", ".j2", ".jinja2") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"--template {spec!r}: no such file. Check the path.")
        return ChatTemplate(path.name, path.read_text("utf-8"))
    raise ConfigError(_unknown_message(spec))


def _as_template(obj, name: str) -> Template:
    if isinstance(obj, Template):
        return obj
    if isinstance(obj, type) and issubclass(obj, Template):
        return obj()
    if isinstance(obj, str):
        return FormatTemplate(name, obj) if "{response}" in obj else ChatTemplate(name, obj)
    raise ConfigError(f"The template plugin {name!r} is a {type(obj).__name__}: it must be a Template or a string.")


def _unknown_message(spec: str) -> str:
    names = plugins.names(plugins.TEMPLATES)
    guess = difflib.get_close_matches(spec, names, n=1)
    hint = f" Did you mean {guess[0]}?" if guess else ""
    return (f"--template {spec!r} is neither a built-in ({', '.join(names)}), a string with one {{prompt}} "
            f"and one {{response}} (e.g. \"Q: {{prompt}}\\nA: {{response}}\"), nor a .jinja file.{hint}")
