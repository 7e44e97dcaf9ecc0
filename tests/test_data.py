"""Tables -> (prompt, response) -> tokens and the loss mask."""

import pandas as pd
import pytest

from ipylora.engine import DataArgs, DatasetError
from ipylora.engine.data import IGNORE_INDEX, LoraDataset, tokenize_pairs
from ipylora.engine.templates import get_template

from support import PROMPT


def test_human_assistant_template_is_the_seed_text(concepts):
    data = LoraDataset("c", concepts, DataArgs(prompt=PROMPT, response="{description}"))
    prompt, response = data.pairs()[0]
    row = concepts.iloc[0]
    assert prompt + response == (
        f"###Human:\ngenerate a stable diffusion prompt for {row.concept}\n\n### Assistant:\n{row.description}"
    )


def test_loss_mask_covers_response_and_eos_only(concepts, tiny_tokenizer):
    data = LoraDataset("c", concepts, DataArgs(prompt=PROMPT, response="{description}"))
    tokens = data.tokenize(tiny_tokenizer, max_length=1024)
    ids, labels = tokens["input_ids"][0], tokens["labels"][0]
    prompt_len = len(tiny_tokenizer(data.pairs()[0][0])["input_ids"])
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert ids[-1] == labels[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(ids[prompt_len:-1]) == concepts.description[0]


def test_eos_is_trained_when_pad_equals_eos(concepts, tiny_tokenizer):
    """The seed's pad = eos: masking by id would hide EOS and the model would never stop."""
    import copy

    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    data = LoraDataset("c", concepts.head(4), DataArgs(prompt=PROMPT, response="{description}"))
    tokens = data.tokenize(tokenizer, max_length=1024)
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(
        [{"input_ids": i, "labels": l} for i, l in zip(tokens["input_ids"], tokens["labels"])]
    )
    for row, ids in enumerate(tokens["input_ids"]):
        assert batch["labels"][row, len(ids) - 1].item() == tokenizer.eos_token_id
        assert (batch["labels"][row, len(ids):] == IGNORE_INDEX).all()


def test_train_on_prompt_and_truncation(tiny_tokenizer):
    pairs = [("question? ", "answer")]
    full = tokenize_pairs(pairs, tiny_tokenizer, 1024, train_on_prompt=True)
    assert IGNORE_INDEX not in full["labels"][0]
    answer = len(tokenize_pairs([("", "answer")], tiny_tokenizer, 1024)["input_ids"][0])  # BOS + answer + EOS
    cut = tokenize_pairs(pairs, tiny_tokenizer, answer)
    assert len(cut["input_ids"][0]) == len(cut["labels"][0]) == answer
    assert cut["labels"][0][1:] == cut["input_ids"][0][1:]  # only the answer and EOS are left after BOS


def test_default_mapping_two_columns_and_text():
    two = LoraDataset("t", pd.DataFrame({"q": ["hi"], "a": ["hello"]}), DataArgs(template="plain"))
    assert two.pairs() == [("hi", "hello")]
    text = LoraDataset("t", pd.DataFrame({"text": ["all of it"], "other": ["x"]}))
    assert text.text_mode and text.pairs() == [("", "all of it")]


def test_column_typo_lists_columns_and_suggests_case(concepts):
    frame = concepts.rename(columns={"concept": "Concept", "description": "Description"})
    with pytest.raises(DatasetError) as err:
        LoraDataset("c", frame, DataArgs(prompt=PROMPT, response="{description}"))
    message = str(err.value)
    assert "Concept, Description" in message and "Did you mean {Concept}?" in message


def test_empty_cells_are_named():
    frame = pd.DataFrame({"q": ["a", None, "c"], "a": ["x", "y", "z"]})
    with pytest.raises(DatasetError, match=r"row\(s\) 2 have empty cells"):
        LoraDataset("c", frame).pairs()


def test_templates():
    assert get_template("alpaca").prefix.endswith("### Response:\n")
    custom = get_template("Q: {prompt}\nA: {response}</s>")
    assert custom.render("x", "y") == ("Q: x\nA: ", "y</s>")
    with pytest.raises(Exception, match="neither a built-in"):
        get_template("human_assistant")
