"""Parsing magic lines: shell-style quoting, and one-line errors that suggest the right flag.

IPython's own `parse_argstring` keeps the quotes around quoted values ('"a b"' stays quoted),
so lines are split here with `shlex` and handed to the magic's argparse parser.
"""

from __future__ import annotations

import difflib
import re
import shlex

from IPython.core.error import UsageError


def parse(func, line: str):
    """Parse `line` with the parser that @magic_arguments attached to `func`."""
    parser = func.parser
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"{exc} in {line.strip()!r}: close the quote, or escape it with a backslash.") from None
    known = _option_strings(parser)
    for token in argv:
        flag = token.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            guess = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            hint = f" Did you mean {guess[0]}?" if guess else f" Options: {' '.join(sorted(k for k in known if k.startswith('--')))}."
            raise UsageError(f"%{parser.prog.lstrip('%')}: unknown option {flag}.{hint}")
    return parser.parse_args(argv)


def split_leading_options(func, line: str) -> tuple[object, str]:
    """For magics whose tail is free text (%lora_chat): parse the leading options, keep the rest raw."""
    parser = func.parser
    takes_value = {o: a.nargs != 0 for a in parser._actions for o in a.option_strings}
    pos = 0
    options = []
    pattern = re.compile(r"\s*(\"[^\"]*\"|'[^']*'|\S+)")
    while True:
        match = pattern.match(line, pos)
        if not match or not match.group(1).startswith("-") or match.group(1) in ("-", "--"):
            if match and match.group(1) == "--":
                pos = match.end()
            break
        flag = match.group(1).split("=", 1)[0]
        options.append(match.group(1))
        pos = match.end()
        if takes_value.get(flag) and "=" not in match.group(1):
            value = pattern.match(line, pos)
            if value:
                options.append(value.group(1))
                pos = value.end()
    return parse(func, " ".join(options)), line[pos:].strip()


def _option_strings(parser) -> list[str]:
    return [o for action in parser._actions for o in action.option_strings]
