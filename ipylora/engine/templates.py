"""Templates turn a (prompt, response) pair into the text the model sees.

A template is a format string with one `{prompt}` and one `{response}`; everything before
`{response}` is the prompt side (no loss unless --train-on-prompt), the response and whatever
follows it carry the loss, and EOS is always appended. At chat time the same prefix is filled
with the user's text, so training and inference see identical tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from ipylora.engine.errors import ConfigError

BUILTIN_TEMPLATES = {
    # The seed notes' template, kept byte for byte (note "###Human" has no space).
    "human-assistant": "###Human:\n{prompt}\n\n### Assistant:\n{response}",
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n{response}"
    ),
    # No wrapping: prompt and response are concatenated as they are.
    "plain": "{prompt}{response}",
}


@dataclass(frozen=True)
class Template:
    """A parsed template: the text before and after the response."""

    name: str
    source: str
    prefix: str
    suffix: str

    def prompt_text(self, prompt: str) -> str:
        """The text that precedes the response, with `prompt` in its slot."""
        return self.prefix.replace("{prompt}", prompt)

    def render(self, prompt: str, response: str) -> tuple[str, str]:
        """(prompt side, response side) of one training example."""
        return self.prompt_text(prompt), response + self.suffix


def get_template(spec: str) -> Template:
    """A built-in template by name, or a custom format string with {prompt} and {response}."""
    source = BUILTIN_TEMPLATES.get(spec, spec)
    if source.count("{response}") != 1 or source.count("{prompt}") != 1:
        names = ", ".join(BUILTIN_TEMPLATES)
        raise ConfigError(
            f"--template {spec!r} is neither a built-in ({names}) nor a string with one "
            "{prompt} and one {response}, e.g. --template \"Q: {prompt}\\nA: {response}\"."
        )
    prefix, suffix = source.split("{response}")
    if "{prompt}" not in prefix:
        raise ConfigError(f"--template {spec!r} puts {{prompt}} after {{response}}: the prompt must come first.")
    name = spec if spec in BUILTIN_TEMPLATES else "custom"
    return Template(name=name, source=source, prefix=prefix, suffix=suffix)
