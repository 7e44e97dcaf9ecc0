"""IPython magics: thin parsers over the engine, one module per magic. Registered by `%load_ext ipylora`."""

import re

_CHAT_LINE = re.compile(r"^\s*%lora_chat\s+\S.*\?$")


def keep_question_marks(lines: list[str]) -> list[str]:
    """IPython reads a line that ends in `word?` as a help request for `word`, so `%lora_chat Can I renew
    online?` would show help on `online`. A trailing space keeps the question for the magic (IPython
    strips it again before the magic sees the line). Cell magics' bodies are data: left alone."""
    if lines and lines[0].lstrip().startswith("%%"):
        return lines
    out = []
    for line in lines:
        body = line.rstrip("\n")
        out.append(body + " " + line[len(body):] if _CHAT_LINE.match(body) else line)
    return out


def register(ipython) -> None:
    from ipylora.magics.chat import ChatMagics
    from ipylora.magics.dataset import DatasetMagics
    from ipylora.magics.runs import RunsMagics
    from ipylora.magics.settings import register_settings
    from ipylora.magics.status import StatusMagics
    from ipylora.magics.train import TrainMagics

    register_settings(ipython)
    cleanup = ipython.input_transformer_manager.cleanup_transforms
    if keep_question_marks not in cleanup:
        cleanup.append(keep_question_marks)
    from ipylora.magics.evaluate import EvalMagics
    from ipylora.magics.export import ExportMagics
    from ipylora.magics.sweep import SweepMagics

    for magics in (DatasetMagics, TrainMagics, ChatMagics, StatusMagics, RunsMagics, EvalMagics, ExportMagics,
                   SweepMagics):
        ipython.register_magics(magics)
    try:
        from ipylora.lab.comm import register_comm_target
    except ImportError:  # the JupyterLab side is optional
        return
    register_comm_target(ipython)
