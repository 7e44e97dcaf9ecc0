"""GRPO rewards: --reward names resolve to functions, are checked against the dataset and their outputs validated."""

import math
import sys
import types

import numpy as np
import pytest
import torch

from ipylora.engine import ConfigError, plugins
from ipylora.engine.rewards import (
    Reward, RewardError, check_columns, combine, for_trl, parse, portable, refuse_for_workers, score, to_spec,
)


def run(spec, completions, namespace=None, **columns):
    [reward] = parse([spec], namespace)
    return score(reward, [f"prompt {i}" for i in range(len(completions))], completions, columns)


def test_exact_and_contains_compare_normalised_text():
    answers = ["Paris", " new  YORK ", "42", None]
    completions = ["paris ", "New York", "The answer is 42", "anything"]

    assert run("exact:answer", completions, answer=answers)[:3] == [1.0, 1.0, 0.0]
    assert run("contains:answer", completions, answer=answers)[:3] == [1.0, 1.0, 1.0]
    assert math.isnan(run("exact:answer", completions, answer=answers)[3])  # no answer: not applicable
    assert run("contains:answer", ["I'd say Lyon", "Rome"], answer=[["paris", "lyon"], ["Milan"]]) == [1.0, 0.0]


def test_regex_searches_the_raw_completion():
    assert run("regex:^\\d+$", ["123", "12a", " 7"]) == [1.0, 0.0, 0.0]
    assert run("regex:(?i)yes", ["YES!", "no"]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match=r"regex:\(: the pattern does not compile"):
        parse(["regex:("])


def test_length_is_one_inside_the_range_and_falls_linearly_outside():
    texts = ["", "x" * 5, "x" * 10, "x" * 30, "x" * 50, "x" * 75, "x" * 100, "x" * 200]
    assert run("length:10-50", texts) == [0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    assert run("length:-50", texts) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    assert run("length:10-", texts) == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert run("length:10-50", ["  " + "x" * 10 + "\n"]) == [1.0]  # surrounding whitespace is not counted
    for bad in ("length:50", "length:50-10", "length:-", "length:a-b", "length"):
        with pytest.raises(ConfigError, match="write length:MIN-MAX"):
            parse([bad])


def test_builtin_rewards_name_their_column_and_the_dataset_must_have_it():
    rewards = parse(["exact:answer"])
    check_columns(rewards, ["prompt", "answer"])
    with pytest.raises(ConfigError, match=r"needs column\(s\) `answer`, which the dataset lacks \(its columns: "
                                          r"prompt, solution\): add the column or name one it has \(exact:COLUMN\)"):
        check_columns(rewards, ["prompt", "solution", "_row"])
    with pytest.raises(ConfigError, match="exact needs the dataset column"):
        parse(["exact"])


def test_weights_and_ambiguous_colons():
    def correct(prompts, completions, **columns):
        return [1.0] * len(completions)

    ns = {"correct": correct}
    rewards = parse(["correct", "correct:0.5", "regex:a:1", "regex:1", "length:10-50", "length:-50:2",
                     "exact:answer:3"], ns)
    assert [(r.spec, r.weight) for r in rewards] == [
        ("correct", 1.0), ("correct", 0.5), ("regex:a", 1.0), ("regex:1", 1.0), ("length:10-50", 1.0),
        ("length:-50", 2.0), ("exact:answer", 3.0)]
    assert [r.name for r in rewards] == [
        "correct", "correct_2", "regex_a", "regex_1", "length_10_50", "length_50", "exact_answer"]
    assert [r.builtin for r in rewards] == [False, False, True, True, True, True, True]
    assert run("regex:a:1", ["cat", "dog"]) == [1.0, 0.0]  # the pattern is `a`, not `a:1`


@pytest.mark.parametrize("spec, message", [
    ("correct:-1", r"weight must be a finite number >= 0 \(got -1.0\): to penalise"),
    ("correct:inf", r"weight must be a finite number >= 0 \(got inf\)"),
    ("correct:nan", r"weight must be a finite number >= 0 \(got nan\)"),
])
def test_bad_weights_are_refused_with_the_fix(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse([spec], {"correct": lambda prompts, completions: [0.0] * len(completions)})


def test_callables_and_tuples_and_import_paths(tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text(
        "def short(prompts, completions, **columns):\n    return [float(len(c) < 5) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "myrewards", raising=False)

    def mine(prompts, completions):
        return [0.0] * len(completions)

    a, b, c, d = parse([mine, (mine, 0.25), "myrewards:short:2", "myrewards.short"])

    assert (a.name, a.weight, b.name, b.weight) == ("mine", 1.0, "mine_2", 0.25)
    assert (c.name, c.weight, c.module, c.builtin) == ("myrewards.short", 2.0, "myrewards", False)
    assert d.name == "myrewards.short_2"
    assert score(c, ["p", "p"], ["hi", "hello there"], {}) == [1.0, 0.0]
    with pytest.raises(ConfigError, match="module myrewards has no 'shrot'"):
        parse(["myrewards:shrot"])


def test_a_name_is_looked_up_in_the_namespace_first():
    def exact(prompts, completions):  # shadows the built-in kind for the bare name
        return [0.5] * len(completions)

    [reward] = parse(["exact"], {"exact": exact})
    assert reward.fn is exact and not reward.builtin and reward.spec == "exact"


def test_unknown_name_lists_the_notebook_functions_and_the_builtins():
    def correct(prompts, completions):
        return []

    ns = {"correct": correct, "fmt_ok": lambda prompts, completions: [], "_private": correct, "np": np,
          "Reward": Reward, "get_ipython": lambda: None, "In": [], "Out": {}, "x": 3}

    with pytest.raises(ConfigError) as caught:
        parse(["corect"], ns)
    message = str(caught.value)
    assert "\n" not in message and "Unknown --reward 'corect'" in message
    assert "(correct, fmt_ok)" in message  # no _private, module, class, IPython names or non-callables
    for form in ("exact:COLUMN", "contains:COLUMN", "regex:PATTERN", "length:MIN-MAX"):
        assert form in message
    assert message.endswith("Did you mean correct?")

    with pytest.raises(ConfigError, match=r"Did you mean exact:answer\?"):
        parse(["exat:answer"], ns)
    with pytest.raises(ConfigError, match="Unknown --reward 'nosuch'"):
        parse(["nosuch:2"], ns)


def test_a_name_bound_to_a_non_callable_is_one_line():
    with pytest.raises(ConfigError, match=r"^--reward answer: answer in the notebook is a str, not a function"):
        parse(["answer"], {"answer": "Paris"})


def test_check_columns_accepts_kwargs_and_named_columns_and_refuses_missing_ones():
    def takes_all(prompts, completions, **columns):
        return []

    def named(prompts, completions, answer, hint=None):
        return []

    def by_keyword(completions, **kwargs):  # TRL's documented form: prompts arrive in **kwargs
        return []

    def needs(prompts, completions, solution, unit):
        return []

    def one_arg(completions):
        return []

    check_columns(parse([takes_all, named, by_keyword]), ["prompt", "answer"])
    with pytest.raises(ConfigError, match=r"^reward `needs` needs column\(s\) `solution`, `unit`, which the dataset "
                                          r"lacks \(its columns: prompt, answer\): add the column or give the "
                                          r"parameter a default\.$"):
        check_columns(parse([needs]), ["prompt", "answer", "_row", "_prompt_text"])
    with pytest.raises(ConfigError, match=r"reward `one_arg` takes \(completions\): a reward takes \(prompts, "
                                          r"completions, \*\*columns\)"):
        check_columns(parse([one_arg]), ["prompt"])


def test_score_passes_only_the_columns_a_function_names():
    seen = {}

    def named(prompts, completions, answer):
        seen["named"] = (prompts, answer)
        return [float(c == a) for c, a in zip(completions, answer)]

    def by_keyword(*, completions, prompts, **kwargs):
        seen["kw"] = sorted(kwargs)
        return [1] * len(completions)

    columns = {"answer": ["a", "b"], "level": [1, 2], "_row": [5, 6]}
    assert score(parse([named])[0], ["p1", "p2"], ["a", "x"], columns) == [1.0, 0.0]
    assert seen["named"] == (["p1", "p2"], ["a", "b"])
    assert score(parse([by_keyword])[0], ["p1", "p2"], ["a", "x"], columns) == [1.0, 1.0]
    assert seen["kw"] == ["answer", "level"]  # not _row


def test_score_accepts_none_bools_and_numpy_and_torch_numbers():
    def mixed(prompts, completions):
        return [None, True, np.float32(0.5), torch.tensor(2.0), 3]

    assert [None if math.isnan(v) else v for v in score(parse([mixed])[0], ["p"] * 5, ["c"] * 5, {})] == [
        None, 1.0, 0.5, 2.0, 3.0]

    def array(prompts, completions):
        return np.array([0.25, 0.75])

    assert score(parse([array])[0], ["p"] * 2, ["c"] * 2, {}) == [0.25, 0.75]


ROWS = [10, 10, 11, 11]


def bad(returns):
    def judge(prompts, completions, **columns):
        return returns(completions)
    return parse([judge])[0]


@pytest.mark.parametrize("returns, message", [
    (lambda c: [1.0] * 3, r"^reward `judge` returned 3 values for 4 completions \(dataset rows 10, 11\): return one "
                          r"float per completion\.$"),
    (lambda c: [1.0, 1.0, "0.5", 1.0], r"^reward `judge` returned the string '0.5' at dataset row 11: return a float"),
    (lambda c: [1.0, 1.0, 1.0, {"score": 1}], r"^reward `judge` returned a dict at dataset row 11: return a float"),
    (lambda c: [1.0, math.nan, 1.0, 1.0], r"^reward `judge` returned nan at dataset row 10: return None to skip a row"),
    (lambda c: [1.0, 1.0, 1.0, -math.inf], r"^reward `judge` returned -inf at dataset row 11: return None to skip"),
    (lambda c: 0.5, r"^reward `judge` returned a single number \(0.5\), not a list \(dataset rows 10, 11\): return "
                    r"one float per completion \(4 here\)\.$"),
    (lambda c: None, r"^reward `judge` returned None \(a missing return\?\), not a list"),
    (lambda c: "1.0", r"^reward `judge` returned a str, not a list"),
])
def test_each_bad_output_is_one_line_naming_the_function_and_the_row(returns, message):
    with pytest.raises(RewardError, match=message) as caught:
        score(bad(returns), ["p"] * 4, ["a", "b", "c", "d"], {}, rows=ROWS)
    assert "\n" not in str(caught.value) and isinstance(caught.value, ConfigError)


def test_a_raising_reward_names_the_row_that_raises_and_its_prompt():
    def parse_number(prompts, completions, **columns):
        return [float(c) for c in completions]

    prompts = ["What is 2+2? Answer with a number only, and nothing else, please: thanks!", "Say 7", "Say 8"]
    with pytest.raises(RewardError) as caught:
        score(parse([parse_number])[0], prompts, ["4", "seven", "8"], {}, rows=[3, 4, 5])
    message = str(caught.value)
    assert message.startswith("reward `parse_number` raised ValueError: could not convert string to float: 'seven' "
                              "at dataset row 4 (prompt 'Say 7'): fix the function, or return None")
    with pytest.raises(RewardError, match=r"ValueError: .* at dataset row 0 \(prompt 'What is 2\+2\? Answer with a "
                                          r"number only, and nothing else, pl'\)"):  # its first 60 characters
        score(parse([parse_number])[0], prompts, ["four", "7", "8"], {})


def test_for_trl_drops_trls_kwargs_and_maps_row_and_prompt_text():
    seen = {}

    def strict(prompts, completions, answer):  # no **kwargs: TRL's extras would be a TypeError
        seen["prompts"] = prompts
        return [float(c == a) for c, a in zip(completions, answer)]

    def loose(prompts, completions, **columns):
        seen["columns"] = sorted(columns)
        return [None] * len(completions)

    funcs, weights = for_trl(parse([strict, (loose, 0.5)]))
    trl_kwargs = dict(completion_ids=[[1], [2]], trainer_state=object(), log_extra=print, log_metric=print)

    got = funcs[0](prompts=["<user>Q1<bot>", "<user>Q2<bot>"], completions=["a", "x"], answer=["a", "b"],
                   _row=[7, 8], _prompt_text=["Q1", "Q2"], **trl_kwargs)
    assert got == [1.0, 0.0] and seen["prompts"] == ["Q1", "Q2"]
    assert [f.__name__ for f in funcs] == ["strict", "loose"] and weights == [1.0, 0.5]
    assert all(math.isnan(v) for v in funcs[1](prompts=["a"], completions=["b"], answer=["c"], _row=[3], **trl_kwargs))
    assert seen["columns"] == ["answer"]

    with pytest.raises(RewardError, match="returned the string .x. at dataset row 8"):
        for_trl(parse([lambda prompts, completions: [1.0, "x"]]))[0][0](
            prompts=["p", "p"], completions=["a", "b"], _row=[7, 8], **trl_kwargs)

    funcs, _ = for_trl(parse([strict]), prompt_texts={"<user>Q1<bot>": "Q1"})
    funcs[0](prompts=["<user>Q1<bot>"], completions=[[{"role": "assistant", "content": "a"}]], answer=["a"])
    assert seen["prompts"] == ["Q1"]


def test_combine_sums_with_weights_and_leaves_out_nan_as_trl_does():
    rewards = [Reward("a", print, 1.0), Reward("b", print, 0.5), Reward("c", print, 0.0)]
    nan = math.nan
    total = combine(rewards, [[1.0, nan, nan, 1.0], [2.0, 2.0, nan, nan], [5.0, 5.0, nan, 5.0]])
    assert total[:2] == [2.0, 1.0] and math.isnan(total[2]) and total[3] == 1.0


PLUGIN = '''
def starts_with(prefix):
    """A factory: `starts:PREFIX`."""
    def reward(prompts, completions, **columns):
        return [float(c.startswith(prefix or "")) for c in completions]
    return reward

starts_with.usage = "starts:PREFIX"


def polite(prompts, completions, **columns):
    """A plain reward: `polite`."""
    return [float("please" in c) for c in completions]
'''


@pytest.fixture
def plugin_installed(tmp_path, monkeypatch):
    """A package `reward_plugin` with a dist-info declaring two ipylora.rewards entry points, on sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "reward_plugin.py").write_text(PLUGIN)
    info = site / "reward_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: reward-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[ipylora.rewards]\nstarts = reward_plugin:starts_with\npolite = reward_plugin:polite\n")
    monkeypatch.syspath_prepend(str(site))
    plugins._declared.clear()
    yield
    sys.modules.pop("reward_plugin", None)
    plugins._declared.clear()
    for target in ("reward_plugin:starts_with", "reward_plugin:polite"):
        plugins._loaded.pop((plugins.REWARDS, target), None)


def test_a_reward_from_an_entry_point_is_a_factory_or_the_reward_itself(plugin_installed):
    starts, polite = parse(["starts:Yes:2", "polite"])

    assert (starts.name, starts.weight, starts.builtin, polite.builtin) == ("starts_Yes", 2.0, True, True)
    assert score(starts, ["p", "p"], ["Yes sir", "No"], {}) == [1.0, 0.0]
    assert score(polite, ["p", "p"], ["please do", "do it"], {}) == [1.0, 0.0]
    assert to_spec(starts) == "starts:Yes:2.0" and to_spec(polite) == "polite:1.0"
    with pytest.raises(ConfigError, match="the reward 'polite' takes no argument"):
        parse(["polite:loud"])
    with pytest.raises(ConfigError, match="starts:PREFIX"):
        parse(["nosuch"])


def test_without_the_package_its_rewards_are_unknown():
    with pytest.raises(ConfigError, match="Unknown --reward 'polite'"):
        parse(["polite"])


def test_portable_for_module_functions_not_notebook_ones(tmp_path, monkeypatch):
    (tmp_path / "myrewards2.py").write_text("def short(prompts, completions):\n    return [0.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "myrewards2", raising=False)
    main = types.ModuleType("__main__")  # what a notebook cell's functions look like
    exec("def correct(prompts, completions):\n    return [1.0] * len(completions)\n", main.__dict__)

    module_fn, = parse(["myrewards2:short"])
    notebook_fn, = parse(["correct"], main.__dict__)
    lam, = parse([lambda prompts, completions: []])
    builtin, = parse(["exact:answer:2"])

    assert portable(module_fn) == "myrewards2:short" and module_fn.module == "myrewards2"
    assert portable(notebook_fn) is None and notebook_fn.module is None
    assert portable(lam) is None and portable(builtin) is None  # a built-in is a closure over its argument
    assert to_spec(builtin) == "exact:answer:2.0" and to_spec(module_fn) == "myrewards2:short:1.0"
    assert parse([to_spec(builtin)])[0].weight == 2.0

    refuse_for_workers([module_fn, builtin])
    with pytest.raises(ConfigError, match=r"^--gpus 2 scores rewards in worker processes, which cannot see the "
                                          r"notebook: `correct` is defined there .* pass --reward mymodule:correct; "
                                          r"built-ins such as exact:COLUMN work as they are\.$"):
        refuse_for_workers([module_fn, notebook_fn, builtin])
