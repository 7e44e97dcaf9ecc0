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


def live_rss() -> int:
    """RSS once freed memory is handed back to the OS (glibc keeps freed heap pages).

    Measured in the interrupt test after 160 earlier tests in one process: raw RSS swung between
    801 and 858 MB from one cycle to the next (two full-suite runs failed on +5.2% and +5.5%),
    while this figure stayed within 0.01% over the ten cycles: freed memory, not a leak.
    """
    import ctypes
    import gc

    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    return psutil.Process().memory_info().rss


def run_cell_output(ip, capsys, source):
    """Run like a notebook cell; return (stdout, stderr)."""
    capsys.readouterr()
    ip.run_cell(source, store_history=False)
    captured = capsys.readouterr()
    return captured.out, captured.err


def assert_one_line_error(ip, capsys, source, *needles):
    """The cell prints exactly one line, a UsageError naming each of `needles`, and no traceback."""
    out, err = run_cell_output(ip, capsys, source)
    text = (out + err).strip()
    assert "Traceback" not in text, text
    assert text.startswith("UsageError: ") and "\n" not in text, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return text


def run_notebook(cells: list[str], folder):
    """Execute `cells` as a new notebook on a real kernel (nbclient) in `folder`; save it there as
    nbK.ipynb (the next free K). Returns (the executed notebook, its path)."""
    import nbformat
    from nbclient import NotebookClient
    from nbformat.v4 import new_code_cell, new_notebook

    notebook = new_notebook(cells=[new_code_cell(c) for c in cells])
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    path = folder / f"nb{len(list(folder.glob('nb*.ipynb')))}.ipynb"
    nbformat.write(notebook, path)
    return notebook, path
