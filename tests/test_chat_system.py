"""System prompts travel from training to chat: the trained one by default, --system to change it,
the same tokens as training (single- and multi-turn), compare on a messages dataset, the widget box."""

import copy

import pandas as pd
import pytest

from ipylora.engine import DataArgs, GenerateArgs, TrainArgs
from ipylora.engine.chat import PromptFormat, prompt_ids
from ipylora.engine.data import IGNORE_INDEX, LoraDataset
from ipylora.engine.events import Sample
from ipylora.engine.session import Session
from support import assert_one_line_error, ipython_shell, run_cell_output

# A shared system prompt of a few dozen words, with a newline in it (typed as \n in a magic line).
SYSTEM = ("You are Sparrow, the help desk of the Lakeside public library.\nAnswer in one short sentence, "
          "mention the library by name when it helps, and never invent opening hours or fees that you were not told.")
# (Magic lines here end without "?": IPython reads a line ending in "word?" as help on that word.)
TURNS = [
    ("Opening time on Monday, please.", "Lakeside opens at nine on Monday."),
    ("I want to renew a book online.", "Yes, renew it on the Lakeside website."),
    ("Do you have a printer?", "There is a printer by the front desk."),
    ("Is there parking?", "Park behind the building for free."),
    ("Can kids get a card?", "Children get a card with a parent present."),
    ("Where are the maps?\nThe old ones.", "Old maps are in the local history room."),
    ("Do you lend laptops?", "Laptops can be borrowed for two hours."),
    ("How many books can I take?", "You may take up to twelve books."),
    ("Is the cafe open?", "The cafe closes at four every day."),
    ("Can I book a room?", "Study rooms are booked at the desk."),
]
GEN = GenerateArgs(adapter="sys", max_new_tokens=40)


def _rows(system=SYSTEM, turns=TURNS):
    return pd.DataFrame({"messages": [
        ([{"role": "system", "content": system}] if system else [])
        + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        for user, answer in turns]})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model trained to memorise the 10 rows (all under one system prompt), with a sample prompt."""
    s = Session()
    s.add_dataset("sys", _rows())
    events = []
    end = s.train("sys", TrainArgs(name="sys", steps=60, samples=(TURNS[0][0],), sample_every=60,
                                   output=str(tmp_path_factory.mktemp("runs"))), reporter=events.append)
    assert end.status == "finished", end
    return s, events


@pytest.fixture
def session(trained):
    return trained[0]


@pytest.fixture
def shell(session, monkeypatch):
    return ipython_shell(monkeypatch, session)


def test_chat_with_only_the_user_text_gives_the_trained_answers(session):
    answers = [session.chat(user, GEN)["text"] for user, _ in TURNS]
    assert sum(a == want for a, (_, want) in zip(answers, TURNS)) >= 9, answers
    bare = [session.chat(user, GEN, system="")["text"] for user, _ in TURNS]
    assert sum(a == want for a, (_, want) in zip(bare, TURNS)) <= 3, bare
    assert session.system_prompt("sys").text == SYSTEM and session.system_prompt("sys").note == ""


def test_training_samples_are_answered_under_the_system_prompt(trained):
    _, events = trained
    samples = [e for e in events if isinstance(e, Sample)]
    assert samples and samples[-1].text == TURNS[0][1], samples


def _chat_part(ids, labels):
    """The row's tokens before its last trained span: what chat must send to get that answer."""
    start = len(labels)
    while labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return ids[:start]


@pytest.mark.parametrize("template", ["human-assistant", "alpaca", "chatml", "Q: {prompt}\nA: {response}\n\n"])
def test_chat_tokens_equal_training_tokens_single_and_multi_turn(tiny_tokenizer, template):
    tok = tiny_tokenizer
    (u1, a1), (u2, a2), (u3, a3) = TURNS[:3]
    conversation = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": u1},
                    {"role": "assistant", "content": a1}, {"role": "user", "content": u2},
                    {"role": "assistant", "content": a2}, {"role": "user", "content": u3},
                    {"role": "assistant", "content": a3}]
    data = LoraDataset("t", pd.DataFrame({"messages": [conversation, conversation[:3]]}), DataArgs(template=template))
    tokens = data.tokenize(tok, 10**6)
    fmt = PromptFormat("template", data.template)
    three_turns = prompt_ids(tok, fmt, u3, [(u1, a1), (u2, a2)], SYSTEM)
    assert three_turns == _chat_part(tokens["input_ids"][0], tokens["labels"][0])
    one_turn = prompt_ids(tok, fmt, u1, system=SYSTEM)
    assert one_turn == _chat_part(tokens["input_ids"][1], tokens["labels"][1])
    assert prompt_ids(tok, fmt, u1) != one_turn  # the system prompt is in the tokens, not dropped


def test_the_adapters_prompt_format_sends_the_training_rows_tokens(session):
    data = session.dataset("sys")
    tokens = data.tokenize(session.tokenizer, 10**6)
    fmt = session.prompt_format("sys")
    for row in (0, 5):
        ids = prompt_ids(session.tokenizer, fmt, TURNS[row][0], system=session.system_prompt("sys").text)
        assert ids == _chat_part(tokens["input_ids"][row], tokens["labels"][row])


def test_model_chat_template_gets_the_system_message_first(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    ids = prompt_ids(tok, PromptFormat("chat"), "two", [("one", "uno")], "Be brief.")
    # As `--template model` training tokenized it: the tokenizer's BOS first, EOS after each trained answer.
    assert tok.decode(ids) == "<|bos|><system>Be brief.\n<user>one\n<assistant>uno<|eos|>\n<user>two\n<assistant>"


def test_magic_uses_the_trained_system_and_system_option_overrides(shell, session, capsys):
    user, answer = TURNS[1]
    out, err = run_cell_output(shell, capsys, f"%lora_chat --adapter sys --max-new-tokens 40 {user}")
    assert out.strip() == answer and not err
    out, err = run_cell_output(shell, capsys, f"%lora_chat --adapter sys --max-new-tokens 40 --system none {user}")
    assert answer not in out and not err
    assert out.strip().startswith(session.chat(user, GEN, system="")["text"].strip()[:20])
    # \n in --system and in the text is a newline: the trained system prompt typed by hand, a two-line turn.
    typed = SYSTEM.replace("\n", "\\n")
    out, err = run_cell_output(shell, capsys, f'%lora_chat --adapter sys -n 40 --system "{typed}" {user}')
    assert out.strip() == answer and not err
    user, answer = TURNS[5]
    typed = user.replace("\n", "\\n")
    out, err = run_cell_output(shell, capsys, f"%lora_chat --adapter sys -n 40 {typed}")
    assert out.strip() == answer and not err


def test_notes_go_to_stdout(shell, capsys):
    out, err = run_cell_output(shell, capsys, f"%lora_chat --adapter sys --max-new-tokens 2 {TURNS[0][0]}")
    assert not err and out.strip().splitlines()[-1] == "[no EOS: stopped at --max-new-tokens 2]"


def test_varied_system_prompts_use_the_most_common_and_say_which(fresh_session, capsys):
    other = "You are a pirate."
    frame = pd.concat([_rows(turns=TURNS[:6]), _rows(system=other, turns=TURNS[6:8]),
                       _rows(system=None, turns=TURNS[8:])], ignore_index=True)
    fresh_session.add_dataset("mixed", frame)
    choice = fresh_session.system_prompt("base")
    assert choice.text == SYSTEM
    assert "the most common of 2 in training (6 of 10 rows; 2 had none)" in choice.note
    assert "You are Sparrow" in choice.note and "\n" not in choice.note
    ip = ipython_shell()
    out, err = run_cell_output(ip, capsys, "%lora_chat --adapter base --max-new-tokens 2 hello")
    first = out.splitlines()[0]
    assert not err and first.startswith("[system prompt: the most common of 2") and "--system" in first
    out, err = run_cell_output(ip, capsys, "%lora_chat --adapter base --system none --max-new-tokens 2 hello")
    assert "[system prompt" not in out


def test_compare_prompts_from_a_messages_dataset_shows_the_real_prompts(shell, session, capsys):
    out, err = run_cell_output(shell, capsys,
                               "%lora_chat --compare base,sys --prompts-from sys --limit 4 --max-new-tokens 40")
    assert not err
    for user, answer in TURNS[:4]:
        assert f"## {user}  (after the system prompt)" in out and f"reference: {answer}" in out
    answers = [line for line in out.splitlines() if line.startswith("  sys: ")]
    assert len(answers) == 4 and len(set(answers)) == 4
    assert sum(f"  sys: {answer}  [" in out for _, answer in TURNS[:4]) >= 3, out
    # A text prompt is sent under each adapter's trained system prompt, like %lora_chat.
    result = session.compare([TURNS[2][0]], ["sys"], GEN)
    assert result["answers"]["sys"][0]["text"] == session.chat(TURNS[2][0], GEN)["text"] == TURNS[2][1]
    assert session.compare([TURNS[2][0]], ["sys"], GEN, system="")["answers"]["sys"][0]["text"] \
        == session.chat(TURNS[2][0], GEN, system="")["text"]


def test_widget_system_box_is_prefilled_and_sent(session):
    from ipylora.ui.chat_widget import ChatWidget

    widget = ChatWidget(session, GenerateArgs(adapter="sys", max_new_tokens=40), update_every_s=0)
    assert widget.system.value == SYSTEM and widget.system_note.value.count("system prompt") == 0
    widget.send(TURNS[3][0])
    widget.wait(60)
    assert widget.history[-1] == TURNS[3]
    widget.clear()
    widget.system.value = ""
    widget.send(TURNS[3][0])
    widget.wait(60)
    assert widget.history[-1][1] == session.chat(TURNS[3][0], GEN, system="")["text"] != TURNS[3][1]
    widget.adapter.value = "base"  # an edited box is kept when the adapter changes
    assert widget.system.value == ""
    widget.close()


def test_system_misuse_is_one_line(shell, capsys):
    for line, needle in [("%lora_chat --raw --system 'Be brief.' hi", "drop --system, or drop --raw"),
                         ("%lora_chat --system '' hi", "--system none"),
                         ("%lora_chat --system 'Be brief.'", "TEXT"),
                         ("%lora_chat --compare base,sys --raw hi", "--raw")]:
        assert_one_line_error(shell, capsys, line, needle)


def test_a_chat_template_without_a_system_role_says_so(tiny_tokenizer):
    from ipylora.engine import ConfigError

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(ConfigError, match="System role not supported.*--system none"):
        prompt_ids(tok, PromptFormat("chat"), "hi", system="Be brief.")
    ids = prompt_ids(tok, PromptFormat("chat"), "hi")
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]).strip() == "hi"  # BOS as training adds it
