"""Bad data through %%lora_dataset: each mistake is one line that says the fix, and the session survives."""

import pandas as pd
import pytest

from support import ipython_shell


@pytest.fixture
def shell(fresh_session, tiny_tokenizer):
    fresh_session._tiny_tokenizer = tiny_tokenizer
    return ipython_shell()


def one_line_error(ip, capsys, source, *needles):
    capsys.readouterr()
    ip.run_cell(source, store_history=False)
    captured = capsys.readouterr()
    text = (captured.out + captured.err).strip()
    assert "Traceback" not in text, text
    assert text.startswith("UsageError: ") and "\n" not in text, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return text


def test_bad_files(shell, capsys, tmp_path):
    (tmp_path / "empty.csv").write_text("")
    one_line_error(shell, capsys, "%lora_dataset bad --from empty.csv", "empty.csv is empty", "header line")
    (tmp_path / "header.csv").write_text("concept,description\n")
    one_line_error(shell, capsys, "%lora_dataset bad --from header.csv", "header (concept, description) but no rows")
    (tmp_path / "ragged.csv").write_text("concept,description\nA,fine\nB,not, quoted\n")
    one_line_error(shell, capsys, "%lora_dataset bad --from ragged.csv", "CSV line 3", "3 fields", "quotes")
    (tmp_path / "bad.json").write_text('[{"a": 1},\n {"a": }]')
    one_line_error(shell, capsys, "%lora_dataset bad --from bad.json", "line 2, column 8", "Fix that spot")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": oops}\n')
    one_line_error(shell, capsys, "%lora_dataset bad --from bad.jsonl", "line 2 of bad.jsonl, column 7")
    (tmp_path / "latin.csv").write_bytes("q,a\ncafé,crème\n".encode("latin-1"))
    one_line_error(shell, capsys, "%lora_dataset bad --from latin.csv", "not UTF-8", "line 2", "re-save it as UTF-8")
    (tmp_path / "blob.csv").write_bytes(bytes(range(256)) * 4)
    one_line_error(shell, capsys, "%lora_dataset bad --from blob.csv", "binary file")
    one_line_error(shell, capsys, "%lora_dataset bad", "No data for 'bad'", "--from FILE|VARIABLE")
    one_line_error(shell, capsys, "%%lora_dataset bad --reader yaml\n- a: [1\n", "Invalid YAML in the cell at line")


def test_bad_mappings(shell, capsys):
    shell.user_ns["frame"] = pd.DataFrame({"concept": ["A", "B"], "description": ["x", "y"], "blank": ["", ""]})
    one_line_error(shell, capsys, "%lora_dataset bad --from frame --columns prompt=concpt,response=description",
                   "concept, description, blank", "Did you mean {concept}?")
    one_line_error(shell, capsys, '%lora_dataset bad --from frame --prompt "{Concept}" --response "{description}"',
                   "Did you mean {concept}?")
    one_line_error(shell, capsys, '%lora_dataset bad --from frame --columns prompt=concept,response=description '
                                  '--template "Q: {question}\\nA: {response}"',
                   "uses {question}", "--columns prompt=question")
    one_line_error(shell, capsys, "%lora_dataset bad --from frame --columns prompt=concept,response=blank",
                   "Every response is empty")
    one_line_error(shell, capsys, "%lora_dataset bad --from frame --format alpacca", "Unknown --format 'alpacca'",
                   "Did you mean alpaca?")
    one_line_error(shell, capsys, "%lora_dataset bad --from frame --format alpaca",
                   "needs a 'instruction' column")
    one_line_error(shell, capsys, "%lora_dataset bad --from frame --columns prompt=concept,response=concept",
                   "names column 'concept' twice")
    one_line_error(shell, capsys, "%lora_dataset bad --from frame -c prompt=concept,response=description --template chatmll", "Did you mean chatml?")
    shell.user_ns["holes"] = pd.DataFrame({"q": ["a", None, "c"], "a": ["x", "y", float("nan")]})
    one_line_error(shell, capsys, "%lora_dataset bad --from holes", "row(s) 2 have empty cells in q", "dropna")
    shell.user_ns["three"] = pd.DataFrame({"x": [1], "y": [2], "z": [3]})
    one_line_error(shell, capsys, "%lora_dataset bad --from three", "Cannot tell which columns", "--columns prompt=x,response=y")


def test_bad_sources_and_session_survives(shell, capsys, monkeypatch):
    import datasets

    shell.user_ns["frame"] = pd.DataFrame({"q": ["a"], "a": ["b"]})
    one_line_error(shell, capsys, "%lora_dataset bad --from fram", "No variable, file or folder named 'fram'",
                   "Did you mean 'frame'?")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # a machine without a hub, deterministically
    one_line_error(shell, capsys, "%lora_dataset bad --from tatsu-lab/alpaca", "tatsu-lab/alpaca",
                   "save_to_disk", "--from FOLDER")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    from ipylora.engine import sources

    monkeypatch.setattr(sources, "_hub_reachable", lambda: False)
    one_line_error(shell, capsys, "%lora_dataset bad --from hf:imdb", "Cannot reach the Hugging Face Hub", "imdb")
    one_line_error(shell, capsys, "%lora_dataset bad --from frame --eval 1", "leaving none to train on")
    one_line_error(shell, capsys, "%lora_dataset bad --from frame --eval 0.5 --eval-from frame", "not both")
    from ipylora.engine import get_session

    assert "bad" not in get_session().datasets
    shell.run_line_magic("lora_dataset", "good --from frame")
    assert len(get_session().datasets["good"]) == 1
