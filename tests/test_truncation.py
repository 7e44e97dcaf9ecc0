"""--max-length never loses the answer in silence; text rows split at a marker (--response-after)."""

import json

import pandas as pd
import pytest

from ipylora.engine import DataArgs, DatasetError, TrainArgs
from ipylora.engine.data import IGNORE_INDEX, LoraDataset, tokenize_pairs
from ipylora.engine.events import Notice, RunEnd
from ipylora.engine.session import Session
from support import assert_one_line_error, ipython_shell, run_cell_output

SYSTEM = ("You are ShawGPT, a friendly assistant for a data science channel. Answer in one short sentence, "
          "sign every answer, and never invent facts you were not given. ") * 6


def _messages(n=8, system=SYSTEM, answer="answer number {i} -ShawGPT"):
    return pd.DataFrame({"messages": [[
        {"role": "system", "content": system},
        {"role": "user", "content": f"comment {i}"},
        {"role": "assistant", "content": answer.format(i=i)},
    ] for i in range(n)]})


def _llama_text(n=8):
    return pd.DataFrame({"text": [f"<s>[INST] say the number {w} [/INST] the number is {w}</s>"
                                  for w in ("one", "two", "three", "four", "five", "six", "seven", "eight")[:n]]})


def test_a_long_row_keeps_its_answer_and_eos_and_loses_prompt_from_the_start(tiny_tokenizer):
    data = LoraDataset("m", _messages())
    full = data.tokenize(tiny_tokenizer, 10**6)
    tokens = data.tokenize(tiny_tokenizer, 64)
    assert len(full["input_ids"][0]) > 300  # the system prompt alone is far longer than 64
    report = tokens.truncation
    assert (report.cut_prompt, report.cut_end, report.dropped) == (8, 0, [])
    for ids, labels, whole, whole_labels in zip(tokens["input_ids"], tokens["labels"], full["input_ids"], full["labels"]):
        assert len(ids) == 64
        assert ids[0] == whole[0] == tiny_tokenizer.bos_token_id  # BOS stays
        assert ids[-1] == labels[-1] == tiny_tokenizer.eos_token_id  # EOS stays, trained
        trained = [t for t in labels if t != IGNORE_INDEX]
        assert trained == [t for t in whole_labels if t != IGNORE_INDEX]  # every trained token survives
        assert ids[1:] == whole[-63:]  # what goes is the start of the prompt
    assert "8 row(s) keep their answer + EOS" in report.summary()


def test_text_trained_whole_is_cut_at_the_end_and_a_too_long_answer_is_left_out(tiny_tokenizer):
    text = LoraDataset("t", pd.DataFrame({"text": ["word " * 50]})).tokenize(tiny_tokenizer, 16)
    assert len(text["input_ids"][0]) == 16 and text.truncation.cut_end == 1
    pairs = tokenize_pairs([("q? ", "a long answer " * 10), ("q? ", "short")], tiny_tokenizer, 12)
    assert pairs.truncation.dropped == [0] and len(pairs["input_ids"]) == 1
    assert pairs.truncation.longest_response > 12
    assert "1 row(s) are left out" in pairs.truncation.summary()


def test_short_max_length_trains_with_loss_and_reports_the_cut_rows():
    session = Session()
    session.add_dataset("shaw", _messages())
    events = []
    end = session.train("shaw", TrainArgs(steps=3, max_length=64), reporter=events.append)
    assert end.status == "finished"
    assert end.final_loss > 0.5  # before: every answer was cut away and the "loss" was 0.0000
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert any("--max-length 64: 8 row(s) keep their answer" in n for n in notices), notices
    record = json.loads((session.adapters["shaw"].run_dir / "run.json").read_text())
    assert record["truncation"]["train"]["cut_prompt"] == 8


def test_a_run_with_nothing_to_train_is_refused_before_loading_the_model(monkeypatch, capsys):
    session = Session()
    session.add_dataset("long", _messages(answer="a very long answer that goes on and on for row {i} " * 4))
    with pytest.raises(DatasetError, match="Raise --max-length to at least"):
        session.train("long", TrainArgs(steps=2, max_length=16))
    assert session.model is None and session.load_count == 0  # nothing was loaded
    shell = ipython_shell(monkeypatch, session)
    assert_one_line_error(shell, capsys, "%lora_train long --steps 2 --max-length 16", "--max-length 16",
                          "Raise --max-length")
    assert not session.training  # and the session keeps working
    end = session.train("long", TrainArgs(steps=1, max_length=256), reporter=None)
    assert isinstance(end, RunEnd) and end.status == "finished"


def test_response_after_masks_the_prompt_and_chat_answers_in_the_rows_wrapping(tiny_tokenizer, monkeypatch, capsys):
    data = LoraDataset("llama", _llama_text(), DataArgs(response_after="[/INST]"))
    assert data.template.prompt_text("say the number one") == "<s>[INST] say the number one [/INST]"
    tokens = data.tokenize(tiny_tokenizer, 1024)
    for row, (ids, labels) in enumerate(zip(tokens["input_ids"], tokens["labels"])):
        trained = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
        answer = data.frame.text[row].split("[/INST]", 1)[1]
        assert tiny_tokenizer.decode(trained) == answer + tiny_tokenizer.eos_token
        prompt = [t for t, label in zip(ids, labels) if label == IGNORE_INDEX]
        assert tiny_tokenizer.decode(prompt[1:]) == data.frame.text[row].split("[/INST]")[0] + "[/INST]"
    # The whole loop: train, then chat with the bare instruction gets the trained answer.
    session = Session()
    shell = ipython_shell(monkeypatch, session)
    session.add_dataset("llama", _llama_text(), DataArgs(response_after="[/INST]"))
    session.train("llama", TrainArgs(name="llama"))
    out, _ = run_cell_output(shell, capsys, "%lora_chat say the number three")
    assert out.strip().startswith("the number is three")


def test_response_after_mistakes_get_one_line(monkeypatch, capsys):
    shell = ipython_shell(monkeypatch, Session())
    cell = "%%lora_dataset t --response-after '[/INST]'\ntext\n\"<s>[INST] hi [/INST] hello\"\nno marker here\n"
    assert_one_line_error(shell, capsys, cell, "1 of 2 row(s) do not contain it", "row 2")
    cell = "%%lora_dataset t --response-after '[/INST]'\nprompt,completion\nhi,hello\n"
    assert_one_line_error(shell, capsys, cell, "splits rows of format text", "prompt-completion")


def test_preview_says_text_is_trained_whole_and_names_the_marker(monkeypatch, capsys):
    shell = ipython_shell(monkeypatch, Session())
    shell.user_ns["df"] = _llama_text()
    out, _ = run_cell_output(shell, capsys, "%lora_dataset t --from df")
    assert "whole text of every row is trained" in out and "--response-after '[/INST]'" in out
    out, _ = run_cell_output(shell, capsys, "%lora_dataset t --from df --response-after [/INST]")
    assert "split at '[/INST]'" in out and "<s>[INST] TEXT [/INST]" in out


def test_preview_of_messages_shows_turns_not_the_list_repr_and_the_cut(tiny_tokenizer):
    from ipylora.ui.preview import dataset_preview

    rendered = dataset_preview(LoraDataset("m", _messages()), tiny_tokenizer, "tiny", 64, samples=1)
    page = rendered._repr_html_()
    assert "user (last turn)" in page and "<td>comment 0</td>" in page and "answer number 0 -ShawGPT" in page
    assert "{&#x27;role&#x27;" not in page and "{'role'" not in page
    assert "prompt cut from the start" in page
    assert "8 row(s) keep their answer + EOS and lose prompt tokens from the start" in repr(rendered)
    assert ">rows</text>" in page  # the histogram has a count axis
