"""Every case in tests/bad_inputs/: one line that names the problem and the fix, no traceback,
and the session still trains and chats afterwards."""

import sys

import pytest
from IPython.core.interactiveshell import InteractiveShell

from ipylora.engine import DataArgs, GenerateArgs, TrainArgs
from support import CONCEPTS, PROMPT, ROOT

DATA = ROOT / "tests" / "bad_inputs"
sys.path.insert(0, str(DATA))
from cases import CASES, VARIABLES  # noqa: E402


@pytest.fixture(scope="module")
def shell():
    import pandas as pd

    from ipylora.engine import session as session_module

    previous = session_module._session
    session_module._session = None
    ip = InteractiveShell.instance()
    ip.history_manager.enabled = False
    ip.run_line_magic("load_ext", "ipylora")
    ip.user_ns.update(VARIABLES)
    session = session_module.get_session()
    session.add_dataset("ok", pd.read_csv(CONCEPTS).head(8), DataArgs(prompt=PROMPT, response="{description}"))
    yield ip
    session_module._session = previous


def test_the_corpus_is_big_and_covers_every_magic():
    assert len(CASES) >= 40
    assert len({case_id for case_id, _, _ in CASES}) == len(CASES)
    magics = {source.split()[0].lstrip("%") for _, source, _ in CASES}
    assert {"lora_dataset", "lora_train", "lora_chat", "lora_status", "lora_runs", "lora_adapters",
            "lora_unload"} <= magics


@pytest.mark.parametrize("case_id,source,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_the_session_survives(shell, capsys, case_id, source, needles):
    from ipylora.engine import get_session

    capsys.readouterr()
    result = shell.run_cell(source.replace("{DATA}", str(DATA)), store_history=False)
    captured = capsys.readouterr()
    text = (captured.out + captured.err).strip()
    assert not result.success
    assert "Traceback" not in text, text
    assert text.startswith("UsageError: ") and "\n" not in text, text
    for needle in needles:
        assert needle.lower() in text.lower(), f"{needle!r} not in {text!r}"
    session = get_session()
    assert session.train("ok", TrainArgs(name=f"after-{case_id}", steps=1)).status == "finished"
    assert session.chat("hello", GenerateArgs(max_new_tokens=2))["tokens"] > 0
