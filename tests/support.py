"""Constants shared by the tests (imported as `support`; conftest.py files are not importable by name)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = ROOT / "examples" / "data" / "concepts.csv"
PROMPT = "generate a stable diffusion prompt for {concept}"


def ipython_shell(monkeypatch=None, session=None):
    """An in-process IPython shell with ipylora loaded and history off, as the magic tests use.

    With `session`, that Session becomes the kernel's (`get_session()`) for the test.
    """
    from IPython.core.interactiveshell import InteractiveShell

    if session is not None:
        from ipylora.engine import session as session_module

        monkeypatch.setattr(session_module, "_session", session)
    shell = InteractiveShell.instance()
    shell.history_manager.enabled = False
    shell.run_line_magic("load_ext", "ipylora")
    return shell
