"""Magics in an in-process IPython shell: the happy path, and one-line errors that keep the session."""

import pytest
from IPython.core.error import UsageError

from support import CONCEPTS, PROMPT, assert_one_line_error, ipython_shell, run_cell_output

DATASET_LINE = f'concepts --from {CONCEPTS} --prompt "{PROMPT}" --response "{{description}}"'


@pytest.fixture
def shell(fresh_session):
    yield ipython_shell()


def test_dataset_train_chat_status(shell, capsys):
    shell.run_line_magic("lora_dataset", DATASET_LINE)
    shell.run_cell_magic("lora_dataset", "inline --template plain", 'q,a\n"one, two",three\nfour,five\n')
    assert len(shell.user_ns) >= 0
    from ipylora.engine import get_session

    session = get_session()
    assert len(session.datasets["concepts"]) == 55 and session.datasets["inline"].pairs()[0] == ("one, two", "three")
    shell.run_line_magic("lora_train", "concepts --name sd --steps 4")
    assert session.adapters["sd"].run_dir.name == "sd"
    out, err = run_cell_output(shell, capsys, "%lora_chat --max-new-tokens 5 generate a stable diffusion prompt for Neural Networks")
    assert out.strip() and "no EOS" in out  # a note on stdout, not an error
    out, _ = run_cell_output(shell, capsys, "%lora_status")
    assert "ipylora/tiny-llama" in out and "sd (active)" in out and "concepts (55 rows)" in out


def test_dataset_from_variable_and_quotes_in_chat(shell, capsys):
    import pandas as pd

    shell.user_ns["frame"] = pd.DataFrame({"question": ["what's up?"], "answer": ["not much"]})
    shell.run_line_magic("lora_dataset", "chatty --from frame --template plain")
    out, err = run_cell_output(shell, capsys, "%lora_chat --max-new-tokens 3 what's a \"quote\" doing here")
    assert "Error" not in err and out.strip()


def test_user_mistakes_are_one_line_and_the_session_survives(shell, capsys, tmp_path):
    (tmp_path / "train.csv").write_text("concept,description\nA,b\n")
    assert_one_line_error(shell, capsys, "%%lora_dataset bad\nconcept,description\nA,fine\nB,not, quoted\n",
                          "line 3", "quotes")
    assert_one_line_error(shell, capsys, f'%lora_dataset c --from {CONCEPTS} --prompt "{{Concept}}" --response "{{description}}"',
                          "concept, description", "Did you mean {concept}?")
    assert_one_line_error(shell, capsys, "%lora_dataset c --from train。csv", "Did you mean", "train.csv")
    assert_one_line_error(shell, capsys, "%lora_train nope", "No dataset named 'nope'", "%%lora_dataset nope")
    assert_one_line_error(shell, capsys, f"%lora_dataset c --from {CONCEPTS} --promt x", "unknown option --promt",
                          "Did you mean --prompt?")
    assert_one_line_error(shell, capsys, "%lora_train concepts --lr", "--lr")
    assert_one_line_error(shell, capsys, "%lora_chat --adapter ghost hi", "No adapter named 'ghost'")
    assert_one_line_error(shell, capsys, '%lora_dataset c --from x --prompt "unclosed', "close the quote")
    assert_one_line_error(shell, capsys, f"%lora_dataset c --from {CONCEPTS} --template nope", "neither a built-in")
    # ...and the session still trains and chats.
    shell.run_line_magic("lora_dataset", DATASET_LINE)
    shell.run_line_magic("lora_train", "concepts --name after --steps 3")
    out, _ = run_cell_output(shell, capsys, "%lora_chat --max-new-tokens 4 hello")
    assert out.strip()


def test_magic_help_mentions_options(shell):
    from ipylora.magics.train import TrainMagics

    doc = TrainMagics.lora_train.__doc__
    assert "--4bit" in doc and "--max-length" in doc and "interrupt" in doc.lower()
    with pytest.raises(UsageError):
        shell.run_line_magic("lora_status", "extra")


def test_a_question_mark_at_the_end_of_a_chat_line_is_part_of_the_question(monkeypatch):
    """IPython reads `... online?` as help on `online`; %lora_chat must get the question instead."""
    transform = ipython_shell(monkeypatch).input_transformer_manager.transform_cell
    assert transform("%lora_chat Can I renew online?") == \
        "get_ipython().run_line_magic('lora_chat', 'Can I renew online?')\n"
    assert "pinfo" in transform("%lora_chat?")  # help on the magic itself stays
    assert "why?,because" in transform("%%lora_dataset x\nq,a\nwhy?,because\n")  # cell bodies are data
