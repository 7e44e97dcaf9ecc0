"""Preference data (issue #15): the `preference` and `unpaired-preference` formats, their detection,
--columns / --format, the rows SFT/chat/eval read, the trainers' tokens (built from the SFT spans,
token for token), truncation, the preview and its warnings, and one-line errors through the magic.
"""

import json

import pandas as pd
import pytest

from ipylora.engine import DataArgs, DatasetError
from ipylora.engine.data import LoraDataset, tokenize_segments
from support import assert_one_line_error, ipython_shell

TRIPLES = pd.DataFrame({
    "prompt": ["What color is the sky?", "Where is the sun?"],
    "chosen": ["It is blue.", "In the sky."],
    "rejected": ["It is green.", "In the sea."],
})


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Answer briefly."}
CONVERSATIONAL = [  # TRL's conversational preference format, the prompt implicit in both lists
    {"chosen": [SYSTEM, user("What color is the sky?"), assistant("It is blue.")],
     "rejected": [SYSTEM, user("What color is the sky?"), assistant("It is green.")]},
    {"chosen": [user("Hi"), assistant("Hello!"), user("Where is the sun?"), assistant("In the sky.")],
     "rejected": [user("Hi"), assistant("Hello!"), user("Where is the sun?"), assistant("In the sea.")]},
]


@pytest.fixture
def shell(fresh_session, tiny_tokenizer):
    fresh_session._tiny_tokenizer = tiny_tokenizer
    return ipython_shell()


def dataset(name):
    from ipylora.engine import get_session

    return get_session().datasets[name]


def sft_ids(data, conversation, tokenizer):
    """The SFT tokens of one conversation through the dataset's template (what `tokenize` builds)."""
    return tokenize_segments([data.template.segments(conversation)], tokenizer, 10**6)["input_ids"][0]


# -- detection and rows ---------------------------------------------------------------------------
def test_text_triples_are_paired_preferences_and_sft_reads_the_chosen_answer():
    data = LoraDataset("p", TRIPLES)
    assert data.kind == "preference" and data.mapping.format.name == "preference"
    row = data.preference_rows()[0]
    assert row.prompt == [user("What color is the sky?")]
    assert row.chosen == [assistant("It is blue.")] and row.rejected == [assistant("It is green.")]
    assert data.conversations()[1] == [user("Where is the sun?"), assistant("In the sky.")]
    assert data.pairs()[0] == ("###Human:\nWhat color is the sky?\n\n### Assistant:\n", "It is blue.")
    assert len(data) == 2 and data.describe()["kind"] == "preference"


def test_trl_conversational_lists_with_implicit_prompt(shell):
    body = "\n".join(json.dumps(row) for row in CONVERSATIONAL)
    shell.run_cell_magic("lora_dataset", "conv --template chatml", body)
    data = dataset("conv")
    assert data.kind == "preference"
    first, second = data.preference_rows()
    assert first.prompt == [SYSTEM, user("What color is the sky?")]
    assert first.chosen == [assistant("It is blue.")] and first.rejected == [assistant("It is green.")]
    assert second.prompt == [user("Hi"), assistant("Hello!"), user("Where is the sun?")]
    assert second.rejected == [assistant("In the sea.")]
    assert data.system_summary()["system"] == "Answer briefly."
    assert data.prompt_messages(1) == second.prompt  # chat and eval send the prompt side


def test_conversational_with_explicit_prompt_and_a_system_column():
    frame = pd.DataFrame({"prompt": [[user("2+2?")]], "chosen": [[assistant("4")]], "rejected": [[assistant("5")]],
                          "system": ["Be exact."]})
    row = LoraDataset("p", frame).preference_rows()[0]
    assert row.prompt == [{"role": "system", "content": "Be exact."}, user("2+2?")]
    assert row.chosen == [assistant("4")]


def test_unpaired_rows_with_bool_string_and_int_labels():
    for labels in ([True, False, True], ["true", "False", "TRUE"], [1, 0, 1], ["1", "0", "1"]):
        frame = pd.DataFrame({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"], "label": labels})
        data = LoraDataset("u", frame)
        assert data.kind == "unpaired-preference", labels  # not prompt-completion
        assert [r.label for r in data.preference_rows()] == [True, False, True], labels
    # SFT, chat and eval read the desirable rows only.
    assert [c[-1]["content"] for c in data.conversations()] == ["x", "z"] and len(data) == 2
    assert data.describe()["desirable"] == 2 and data.describe()["undesirable"] == 1


def test_columns_map_other_names(shell):
    shell.run_cell_magic("lora_dataset", "m --columns prompt=q,chosen=good,rejected=bad",
                         "q,good,bad,note\nWhat is up?,The sky.,Nothing.,x\n")
    row = dataset("m").preference_rows()[0]
    assert dataset("m").kind == "preference" and row.prompt == [user("What is up?")]
    assert row.chosen == [assistant("The sky.")] and row.rejected == [assistant("Nothing.")]
    shell.run_cell_magic("lora_dataset", "k --columns question=q,response=a,label=ok",
                         "q,a,ok\nWhat is up?,The sky.,true\nWhy?,Because.,false\n")
    assert dataset("k").kind == "unpaired-preference"
    assert [r.label for r in dataset("k").preference_rows()] == [True, False]


def test_format_forces_the_shape(shell, capsys):
    body = "prompt,completion,label\nWhat is up?,The sky.,positive\n"
    shell.run_cell_magic("lora_dataset", "pc --format prompt-completion", body)  # the label is not KTO's
    assert dataset("pc").kind == "sft" and dataset("pc").conversations()[0][-1]["content"] == "The sky."
    shell.run_cell_magic("lora_dataset", "f --format unpaired-preference", "prompt,response,label\na,b,0\nc,d,1\n")
    assert dataset("f").kind == "unpaired-preference" and len(dataset("f")) == 1
    assert_one_line_error(shell, capsys, "%%lora_dataset x --format preference\nprompt,chosen,bad\na,b,c\n",
                          "needs a 'rejected' column", "prompt, chosen, bad", "--columns rejected=")


def test_bad_label_is_one_line_naming_row_and_value(shell, capsys):
    text = assert_one_line_error(shell, capsys, "%%lora_dataset bad\nprompt,completion,label\na,x,true\nb,y,maybe\n",
                                 "Row 2", "'maybe'", "true/false")
    assert "--format prompt-completion" in text  # the way out when the column is not a KTO label
    from ipylora.engine import get_session

    assert "bad" not in get_session().datasets


def test_shape_errors_are_one_line():
    with pytest.raises(DatasetError, match="no prompt column: map one with --columns prompt=COLUMN"):
        LoraDataset("p", pd.DataFrame({"chosen": ["a"], "rejected": ["b"]})).conversations()
    mixed = pd.DataFrame({"chosen": [[user("q"), assistant("a")]], "rejected": [[user("other"), assistant("b")]]})
    with pytest.raises(DatasetError, match="differ at message 1, a user turn"):
        LoraDataset("p", mixed).conversations()
    sft = LoraDataset("s", pd.DataFrame({"question": ["q"], "good_answer": ["a"]}))
    with pytest.raises(DatasetError) as info:
        sft.require("preference", "--method dpo")
    message = str(info.value)
    assert "\n" not in message and "columns question, good_answer" in message
    assert "--format preference --columns prompt=question,chosen=CHOSEN,rejected=REJECTED" in message
    with pytest.raises(DatasetError, match="needs unpaired-preference data"):
        sft.unpaired_tokens(None, 64)


# -- tokens ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", ["human-assistant", "chatml", "alpaca"])
def test_preference_tokens_are_the_sft_tokens_split_at_the_answer(tiny_tokenizer, template):
    for frame in (TRIPLES, pd.DataFrame(CONVERSATIONAL)):
        data = LoraDataset("p", frame, DataArgs(template=template))
        tokens = data.preference_tokens(tiny_tokenizer, 4096)
        assert set(tokens) == {"prompt_ids", "chosen_ids", "rejected_ids"}
        sft = data.tokenize(tiny_tokenizer, 4096)["input_ids"]  # SFT on the chosen answers
        for i, row in enumerate(data.preference_rows()):
            prompt, chosen, rejected = (tokens[k][i] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
            assert prompt + chosen == sft[i]
            assert prompt + rejected == sft_ids(data, row.prompt + row.rejected, tiny_tokenizer)
            assert prompt[0] == tiny_tokenizer.bos_token_id and tiny_tokenizer.bos_token_id not in chosen
            assert chosen[-1] == rejected[-1] == tiny_tokenizer.eos_token_id
        assert tokens.truncation.cut == 0 and not tokens.truncation.dropped


def test_answer_tokens_carry_the_templates_end_of_turn(tiny_tokenizer):
    data = LoraDataset("p", TRIPLES, DataArgs(template="chatml"))
    tokens = data.preference_tokens(tiny_tokenizer, 4096)
    assert tiny_tokenizer.decode(tokens["chosen_ids"][0]) == "It is blue.<|im_end|><|eos|>"
    assert tiny_tokenizer.decode(tokens["prompt_ids"][0]).endswith("<|im_start|>assistant\n")


def test_unpaired_tokens_match_kto_keys_and_sft(tiny_tokenizer):
    frame = pd.DataFrame({"prompt": ["a", "b"], "completion": ["x y", "z"], "label": [True, False]})
    data = LoraDataset("u", frame)
    tokens = data.unpaired_tokens(tiny_tokenizer, 4096)
    assert set(tokens) == {"prompt_ids", "completion_ids", "label"} and tokens["label"] == [True, False]
    for i, row in enumerate(data.preference_rows()):
        assert tokens["prompt_ids"][i] + tokens["completion_ids"][i] == sft_ids(data, row.prompt + row.completion,
                                                                                 tiny_tokenizer)
    assert data.tokenize(tiny_tokenizer, 4096)["input_ids"] == [tokens["prompt_ids"][0] + tokens["completion_ids"][0]]
    # Paired data for KTO: each pair gives a desirable and an undesirable row.
    paired = LoraDataset("p", TRIPLES).unpaired_tokens(tiny_tokenizer, 4096)
    assert paired["label"] == [True, False, True, False]
    assert paired["prompt_ids"][0] == paired["prompt_ids"][1]


def test_truncation_cuts_the_prompt_from_the_start_and_drops_answers_too_long(tiny_tokenizer):
    long_prompt = " ".join(["sky"] * 80)
    long_answer = " ".join(["blue"] * 80)
    frame = pd.DataFrame({"prompt": [long_prompt, "short", "fits"], "chosen": ["It is blue.", long_answer, "yes"],
                          "rejected": ["No.", "no", "no"]})
    data = LoraDataset("t", frame)
    full = data.preference_tokens(tiny_tokenizer, 10**6)
    answer = max(len(full["chosen_ids"][0]), len(full["rejected_ids"][0]))
    max_length = answer + 20
    assert len(full["prompt_ids"][0]) + answer > max_length and len(full["chosen_ids"][1]) > max_length
    tokens = data.preference_tokens(tiny_tokenizer, max_length)
    report = tokens.truncation
    assert report.cut_prompt == 1 and report.dropped == [1] and len(tokens["prompt_ids"]) == 2
    prompt = tokens["prompt_ids"][0]
    assert len(prompt) + answer == max_length
    assert prompt[0] == tiny_tokenizer.bos_token_id and prompt[1:] == full["prompt_ids"][0][-(len(prompt) - 1):]
    assert tokens["chosen_ids"][0] == full["chosen_ids"][0] and tokens["rejected_ids"][0] == full["rejected_ids"][0]
    assert tokens["prompt_ids"][1] == full["prompt_ids"][2]  # the row that fits is untouched
    assert report.longest_response == len(full["chosen_ids"][1])
    assert "1 row(s) are left out" in report.summary() and data.truncation is report
    with pytest.raises(DatasetError, match="No row of 'x' fits --max-length 3 with its answer"):
        LoraDataset("x", TRIPLES).check_trainable(tiny_tokenizer, 3, shape="preference")


def test_check_trainable_per_shape_keeps_the_tokens_for_the_run(tiny_tokenizer):
    data = LoraDataset("p", TRIPLES, DataArgs(eval=1))
    reports = data.check_trainable(tiny_tokenizer, 256, shape="preference")
    assert set(reports) == {"train", "eval"} and data.eval.kind == "preference"
    kept = data._tokens[1]
    assert data.preference_tokens(tiny_tokenizer, 256) is kept  # computed once
    assert data.check_trainable(tiny_tokenizer, 256)["train"].rows == 1  # --method sft trains on chosen
    all_false = LoraDataset("u", pd.DataFrame({"prompt": ["a"], "completion": ["x"], "label": [False]}))
    with pytest.raises(DatasetError, match="is labelled true, so SFT has nothing to train on"):
        all_false.check_trainable(tiny_tokenizer, 256)


# -- preview --------------------------------------------------------------------------------------
def test_preview_shows_chosen_and_rejected_side_by_side_with_warnings(shell, capsys, tiny_tokenizer):
    from ipylora.ui.preview import dataset_preview

    shell.user_ns["prefs"] = pd.DataFrame({
        "prompt": ["What color is the sky?", "Same?", "Empty?", "Long?"],
        "chosen": ["It is blue.", "yes", "fine", " ".join(["word"] * 200)],
        "rejected": ["It is green.", "yes", "", "no"],
    })
    capsys.readouterr()
    shell.run_line_magic("lora_dataset", "prefs --from prefs --max-length 64 --show 3")
    text = capsys.readouterr().out
    assert "--- sample 1: prompt" in text and "[chosen] It is blue.<|eos|>" in text
    assert "[rejected] It is green.<|eos|>" in text
    data = dataset("prefs")
    tokens = data.preference_tokens(tiny_tokenizer, 10**6)
    lengths = [len(tokens[k][0]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")]
    assert f"prompt {lengths[0]} tokens, chosen {lengths[1]}, rejected {lengths[2]}" in text
    html = dataset_preview(data, tiny_tokenizer, "tiny", 64, samples=2)._repr_html_()
    assert f"chosen · {lengths[1]} tokens</th>" in html and f"rejected · {lengths[2]} tokens</th>" in html
    assert 'background:#dff3e3;color:#0b5d1e">It is blue.&lt;|eos|&gt;</span>' in html
    assert 'background:#dff3e3;color:#0b5d1e">It is green.&lt;|eos|&gt;</span>' in html
    assert '<span style="color:#888">&lt;|bos|&gt;###Human:\nWhat color is the sky?' in html
    for needle in ("1 row(s) have chosen == rejected (e.g. row 2)",
                   "1 row(s) have an empty chosen or rejected answer (e.g. row 3)",
                   "1 row(s) (25.0%) are longer than --max-length 64 tokens",
                   "1 row(s) are left out", "<svg", "median tokens: prompt"):
        assert needle in html, needle
    assert "<th>rejected</th>" in html  # the table of first rows shows the answers, not the raw cells


def test_preview_of_unpaired_shows_completion_label_and_a_single_label_warning(shell, capsys):
    capsys.readouterr()
    shell.run_cell_magic("lora_dataset", "kto", "prompt,completion,label\na,x,true\nb,y,true\n")
    text = capsys.readouterr().out
    assert "2 desirable (label true), 0 undesirable" in text
    assert "[completion (label true)] x<|eos|>" in text
    assert "every row is labelled true" in text and "add rows labelled false" in text
    capsys.readouterr()
    shell.user_ns["frame"] = pd.DataFrame({"prompt": ["a", "b"], "completion": ["x", " "], "label": [True, False]})
    shell.run_line_magic("lora_dataset", "kto2 --from frame")
    text = capsys.readouterr().out
    assert "[completion (label false)]  <|eos|>" in text
    assert "1 row(s) have an empty completion (e.g. row 2)" in text and "every row is labelled" not in text


def test_conversational_preview_through_a_chat_template(shell, capsys):
    body = json.dumps(CONVERSATIONAL)
    capsys.readouterr()
    shell.run_cell_magic("lora_dataset", "c --template chatml --show 2", body)
    text = capsys.readouterr().out
    assert "[chosen] In the sky.<|im_end|><|eos|>" in text
    assert "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|><|eos|>" in text  # earlier turn
    assert "warning" not in text
