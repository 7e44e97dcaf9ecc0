"""Reward functions for GRPO: what `--reward` names, how a reward is called, and what it must return.

GRPO (`--method grpo`) samples several completions per prompt and learns from how their rewards
compare. A reward is a function in TRL's form, `fn(prompts, completions, **columns) -> list[float |
None]`: one value per completion, None where it does not apply, the dataset's other columns given as
keyword lists aligned with the completions. `--reward` names one or more, each looked up as

- a function defined in the notebook (`--reward correct`): the magic passes the user namespace;
- a registered reward, `kind:ARG`: ipylora's `exact:COLUMN`, `contains:COLUMN`, `regex:PATTERN`,
  `length:MIN-MAX`, and any a package adds in the `ipylora.rewards` entry-point group (a factory
  called with ARG, or None without one; or the reward function itself);
- an import path, `mymodule:fn` or `mymodule.fn`;

optionally followed by `:WEIGHT` (rewards are summed with these weights, as TRL does; 0 only logs).

A reward runs deep inside TRL's step, where its traceback names neither the function nor the row.
So `check_columns` matches each signature to the dataset's columns before the model is touched, and
`score` calls a function with only the columns it takes and turns every bad outcome (an exception,
the wrong count, a string, NaN) into one line naming the function, the dataset row and the fix.
`for_trl` wraps rewards as TRL's `reward_funcs`; `portable` says whether a `--gpus` worker process,
which cannot see the notebook, can import a function by name.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import math
import numbers
import re
import sys
import types
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass

from ipylora.engine import plugins
from ipylora.engine.errors import ConfigError

REWARDS = plugins.REWARDS

TRL_KWARGS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")
"""What TRL adds to each reward call; user functions see only dataset columns (eval calls them without TRL)."""
ROW, PROMPT_TEXT = "_row", "_prompt_text"
"""Columns the GRPO method adds: the dataset row of each completion and its prompt before templating."""
_PRIVATE = (ROW, PROMPT_TEXT, "prompts", "completions")
_IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython"}
_P = inspect.Parameter


class RewardError(ConfigError):
    """A reward function raised, or returned something GRPO cannot use."""


@dataclass
class Reward:
    """One `--reward`: a function and its weight in the sum."""

    name: str
    """The metric name (`rewards/{name}/mean`): the spec as written, minus the weight, made identifier-like."""
    fn: Callable
    weight: float = 1.0
    builtin: bool = False
    """From the `ipylora.rewards` registry (ipylora's or a package's): any process rebuilds it from `spec`."""
    module: str | None = None
    """The importable module a user function comes from; None when defined in the notebook (and for built-ins)."""
    spec: str | None = None
    """The string as written, minus the weight; None for a callable passed as such."""


# --- the built-ins: factories taking the text after `kind:` (None without it) -------------------


def _usage(form: str):
    def mark(factory):
        factory.usage = form  # how the unknown-name message lists it
        return factory
    return mark


def _normal(value) -> str:
    return " ".join(str(value).split()).casefold()


def _answers(value) -> list[str] | None:
    """A column value as normalised accepted answers (a list is several); None: the row has none."""
    if value is None:
        return None
    return [_normal(v) for v in value if v is not None] if isinstance(value, (list, tuple)) else [_normal(value)]


def _column_reward(kind: str, column: str | None, test: Callable[[str, str], bool]):
    if not column:
        raise ConfigError(f"--reward {kind} needs the dataset column to compare with: write {kind}:COLUMN "
                          f"(e.g. {kind}:answer).")

    def reward(prompts, completions, **columns):
        out = []
        for completion, value in zip(completions, columns[column]):
            answers = [a for a in _answers(value) or [] if a or kind == "exact"]
            out.append(float(any(test(_normal(completion), a) for a in answers)) if answers else None)
        return out

    reward.required_columns = (column,)  # check_columns reads it: the signature only says **columns
    return reward


@_usage("exact:COLUMN")
def exact(column: str | None):
    """1.0 where the completion equals the row's COLUMN, else 0.0, both with runs of whitespace collapsed to
    one space, stripped and casefolded. A list value holds several accepted answers; None skips the row."""
    return _column_reward("exact", column, str.__eq__)


@_usage("contains:COLUMN")
def contains(column: str | None):
    """1.0 where the row's COLUMN occurs in the completion (normalised as for exact), else 0.0. A list value
    holds several accepted answers; None or an empty value skips the row."""
    return _column_reward("contains", column, lambda completion, answer: answer in completion)


@_usage("regex:PATTERN")
def regex(pattern: str | None):
    """1.0 where `re.search(PATTERN, completion)` matches, else 0.0 (case-sensitive: start with (?i) if not)."""
    if not pattern:
        raise ConfigError("--reward regex needs a pattern: write regex:PATTERN (e.g. regex:'\\d+$').")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--reward regex:{pattern}: the pattern does not compile ({exc}): fix it (a last "
                          ":NUMBER is read as the weight).") from None

    def reward(prompts, completions, **columns):
        return [float(compiled.search(completion) is not None) for completion in completions]

    return reward


@_usage("length:MIN-MAX")
def length(bounds: str | None):
    """Rewards a completion's length n in characters (leading and trailing whitespace stripped): 1.0 for
    MIN <= n <= MAX; below MIN it falls linearly to 0.0 at n = 0 (n / MIN); above MAX it falls linearly to
    0.0 at n = 2*MAX ((2*MAX - n) / MAX) and stays 0.0 beyond. `length:-MAX` has no lower bound (MIN = 0),
    `length:MIN-` no upper one."""
    found = re.fullmatch(r"\s*(\d*)\s*-\s*(\d*)\s*", bounds or "")
    low, high = (int(g) if g else None for g in found.groups()) if found else (None, None)
    if not found or (low is None and high is None) or high == 0 or (high is not None and (low or 0) > high):
        raise ConfigError(f"--reward length:{bounds or ''}: write length:MIN-MAX in characters with MIN <= MAX "
                          "and MAX > 0, e.g. length:50-300, length:-300 (at most) or length:50- (at least).")
    low = low or 0

    def reward(prompts, completions, **columns):
        out = []
        for completion in completions:
            n = len(completion.strip())
            if n < low:
                out.append(n / low)
            elif high is not None and n > high:
                out.append(max(0.0, (2 * high - n) / high))
            else:
                out.append(1.0)
        return out

    return reward


# --- parse: --reward strings to Rewards ---------------------------------------------------------


def parse(specs, namespace: Mapping | None = None) -> list[Reward]:
    """Rewards from `--reward` specs: callables, `NAME`, `NAME:WEIGHT`, `kind:ARG`, `kind:ARG:WEIGHT`,
    `module:fn[:WEIGHT]`; a (spec, weight) tuple or a Reward also works. NAME is looked up in `namespace`
    (the notebook's), then in the registry, then imported. A last `:NUMBER` is the weight when what precedes
    it resolves (`regex:a:1` is pattern `a`, weight 1; `length:-50` has none). Repeated names get `_2`..."""
    if specs is None:
        specs = []
    elif isinstance(specs, (str, Reward, tuple)) or callable(specs):
        specs = [specs]
    rewards, seen = [], set()
    for spec in specs:
        weight = None
        if isinstance(spec, tuple):
            spec, weight = spec
        if isinstance(spec, Reward):
            reward, written = dataclasses.replace(spec), spec.weight
        elif isinstance(spec, str):
            reward, written = _parse_text(spec.strip(), namespace)
        elif callable(spec):
            reward, written = _user(_name_of(spec), spec, None), 1.0
        else:
            raise ConfigError(f"--reward {spec!r}: a reward is a function or its name, not a {type(spec).__name__}.")
        reward.weight = _weight(reward, written if weight is None else weight)
        name, k = reward.name, 2
        while reward.name in seen:
            reward.name, k = f"{name}_{k}", k + 1
        seen.add(reward.name)
        rewards.append(reward)
    return rewards


def _parse_text(text: str, namespace) -> tuple[Reward, float]:
    head, colon, tail = text.rpartition(":")
    weight = _number(tail) if colon else None
    head_error = None
    if weight is not None:
        try:
            reward = _resolve(head, namespace)
        except ConfigError as exc:  # `regex:1`: "regex" alone is no reward; maybe the whole text is
            reward, head_error = None, exc
        if reward is not None:
            return reward, weight
    try:
        reward = _resolve(text, namespace)
    except ConfigError:
        if head_error is not None:
            raise head_error from None
        raise
    if reward is None:
        if head_error is not None:
            raise head_error
        raise _unknown(head if weight is not None else text, namespace)
    return reward, 1.0


def _resolve(text: str, namespace) -> Reward | None:
    """The reward `text` names, None if nothing has that name; ConfigError if it names something unusable."""
    if namespace is not None and text in namespace:
        return _user(text, namespace[text], text, where="in the notebook")
    kind, colon, arg = text.partition(":")
    registered = plugins.get(REWARDS, kind) if kind else None
    if registered is not None:
        if _is_reward(registered):
            if colon:
                raise ConfigError(f"--reward {text}: the reward {kind!r} takes no argument: write --reward {kind}.")
            fn = registered
        else:
            fn = registered(arg if colon else None)
        reward = _user(text, fn, text, where=f"(from the {kind!r} factory)")
        return dataclasses.replace(reward, builtin=True, module=None)
    target = _import(text)
    return None if target is None else _user(text.replace(":", "."), target, text, where="")


def _import(text: str):
    module_name, colon, attr = text.partition(":")
    if not colon:
        module_name, _, attr = text.rpartition(".")
    parts = module_name.split(".") + attr.split(".")
    if not module_name or not attr or not all(p.isidentifier() for p in parts):
        return None
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name + ".").startswith(exc.name + "."):
            return None  # no such module: an unknown name, not a broken one
        raise ConfigError(f"--reward {text}: importing {module_name} failed ({type(exc).__name__}: {exc}): "
                          "install what it needs.") from None
    except Exception as exc:
        raise ConfigError(f"--reward {text}: importing {module_name} failed ({type(exc).__name__}: {_line(exc)}): "
                          "fix the module.") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"--reward {text}: module {module_name} has no {attr!r}: check the spelling "
                              f"(module:function).")
        obj = getattr(obj, part)
    return obj


def _user(name: str, fn, spec: str | None, where: str = "") -> Reward:
    if not callable(fn):
        raise ConfigError(f"--reward {spec or name}: {name} {where + ' ' if where else ''}is a {type(fn).__name__}, "
                          "not a function: define def f(prompts, completions, **columns) returning one float per "
                          "completion and pass its name.")
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):
        raise ConfigError(f"--reward {spec or name}: {name} is async: ipylora calls rewards synchronously, "
                          "make it a plain def.")
    return Reward(_clean(name), fn, module=_module_of(fn), spec=spec)


def _weight(reward: Reward, weight) -> float:
    try:
        value = float(weight)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"--reward {reward.spec or reward.name}: the weight must be a finite number >= 0 (got "
                          f"{weight}): to penalise something return a negative reward from the function; weight 0 "
                          "only logs it.")
    return value


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _is_reward(obj) -> bool:
    """Whether a registered object is a reward itself (takes prompts, completions), not a factory."""
    if isinstance(obj, type):
        return False
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)]
    return (any(p.name in ("prompts", "completions") for p in params) or len(positional) >= 2
            or any(p.kind is _P.VAR_POSITIONAL for p in params))


def _clean(name: str) -> str:
    return re.sub(r"[^\w.]+", "_", name).strip("_.")[:48] or "reward"


def _name_of(fn) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def _module_of(fn) -> str | None:
    while isinstance(fn, functools.partial):
        fn = fn.func
    module = getattr(fn, "__module__", None)
    return None if not module or module == "__main__" or module.startswith("<") else module


def _callables(namespace) -> list[str]:
    return sorted(name for name, value in (namespace or {}).items()
                  if isinstance(name, str) and not name.startswith("_") and name not in _IPYTHON_NAMES
                  and callable(value) and not isinstance(value, (types.ModuleType, type, types.BuiltinFunctionType)))


def _unknown(name: str, namespace) -> ConfigError:
    mine = _callables(namespace)
    kinds = plugins.names(REWARDS)
    forms = []
    for kind in kinds:
        try:
            forms.append(getattr(plugins.get(REWARDS, kind), "usage", kind))
        except ConfigError:
            pass  # a broken plugin fails when named, not while listing
    kind, colon, arg = name.partition(":")
    guess = difflib.get_close_matches(kind, mine + kinds, n=1)
    hint = f" Did you mean {guess[0]}{colon}{arg if guess[0] in kinds else ''}?" if guess else ""
    shown = ", ".join(mine[:12]) + (", ..." if len(mine) > 12 else "") if mine else "none yet"
    return ConfigError(f"Unknown --reward {name!r}: use a function defined in the notebook ({shown}), a built-in "
                       f"({', '.join(forms)}) or an import path module:function.{hint}")


# --- calling a reward ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    """How to call one reward function, read from its signature."""

    by_name: bool
    """prompts=/completions= as keywords (else the first two positional parameters)."""
    takes_all: bool
    """It has **kwargs: every column."""
    takes: frozenset
    """The other parameters it names (columns it gets)."""
    required: tuple
    """Those without a default, plus the columns it lists in `required_columns`."""


def _plan(reward: Reward) -> _Call:
    fn = reward.fn
    needed = tuple(getattr(fn, "required_columns", ()))
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some C callables: call it the way TRL does
        return _Call(True, True, frozenset(), needed)
    params = list(signature.parameters.values())
    named = {p.name for p in params if p.kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY)}
    takes_all = any(p.kind is _P.VAR_KEYWORD for p in params)
    positional = [p for p in params if p.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)]
    if "completions" in named and ("prompts" in named or takes_all):
        by_name, rest = True, [p for p in params if p.name not in ("prompts", "completions")]
    elif len(positional) >= 2 or any(p.kind is _P.VAR_POSITIONAL for p in params):
        by_name, rest = False, [p for p in params if p not in positional[:2]]
    else:
        raise ConfigError(f"reward `{reward.name}` takes {signature}: a reward takes (prompts, completions, "
                          "**columns) and returns one float per completion.")
    stuck = [p.name for p in rest if p.kind is _P.POSITIONAL_ONLY and p.default is p.empty]
    if stuck:
        raise ConfigError(f"reward `{reward.name}` has positional-only parameter(s) {', '.join(stuck)} after "
                          "(prompts, completions): columns come as keywords, so drop the `/` or give them defaults.")
    extra = [p for p in rest if p.kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY)]
    required = needed + tuple(p.name for p in extra if p.default is p.empty and p.name not in needed)
    return _Call(by_name, takes_all, frozenset(p.name for p in extra), required)


def check_columns(rewards: list[Reward], columns: list[str]) -> None:
    """Refuse, before training, rewards whose signatures do not fit or that need columns the dataset lacks."""
    have = [c for c in columns if c not in _PRIVATE]
    problems = []
    for reward in rewards:
        try:
            missing = [c for c in _plan(reward).required if c not in have]
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        if missing:
            problems.append(_missing(reward, missing, have))
    if problems:
        raise ConfigError(" ".join(problems))


def _missing(reward: Reward, missing: list[str], have: list[str]) -> str:
    trl = [c for c in missing if c in TRL_KWARGS]
    if trl:
        return (f"reward `{reward.name}` asks for {', '.join(f'`{c}`' for c in trl)}, which ipylora does not pass "
                "(rewards also score eval, outside TRL): give the parameter a default or drop it.")
    kind = (reward.spec or "").partition(":")[0]
    fix = f"name one it has ({kind}:COLUMN)" if reward.builtin else "give the parameter a default"
    return (f"reward `{reward.name}` needs column(s) {', '.join(f'`{c}`' for c in missing)}, which the dataset lacks "
            f"(its columns: {', '.join(have) or 'none'}): add the column or {fix}.")


def score(reward: Reward, prompts: list, completions: list, columns: Mapping[str, list],
          rows: list[int] | None = None) -> list[float]:
    """The reward's value for each completion (NaN where it returned None), checked: anything wrong raises a
    one-line RewardError naming the function, the dataset row (`rows[i]`, else the index) and the fix."""
    call = _plan(reward)
    n = len(completions)
    where = list(rows) if rows is not None else list(range(n))
    data = {k: v for k, v in columns.items() if k not in _PRIVATE}
    missing = [c for c in call.required if c not in data]
    if missing:
        raise RewardError(_missing(reward, missing, list(data)))
    kwargs = data if call.takes_all else {k: v for k, v in data.items() if k in call.takes}
    try:
        out = _invoke(reward.fn, call, prompts, completions, kwargs)
    except Exception as exc:
        raise RewardError(_raised(reward, call, exc, prompts, completions, kwargs, where)) from exc
    values = _as_list(out)
    if values is None:
        raise RewardError(f"reward `{reward.name}` returned {_describe(out)}, not a list{_rows(where)}: return one "
                          f"float per completion ({n} here).")
    if len(values) != n:
        raise RewardError(f"reward `{reward.name}` returned {len(values)} values for {n} completions{_rows(where)}: "
                          "return one float per completion.")
    return [_value(reward, v, where[i] if i < len(where) else i) for i, v in enumerate(values)]


def _invoke(fn, call: _Call, prompts, completions, kwargs):
    if call.by_name:
        return fn(prompts=prompts, completions=completions, **kwargs)
    return fn(prompts, completions, **kwargs)


def _raised(reward, call, exc, prompts, completions, kwargs, where) -> str:
    """The error line for a raising reward, with the first row that raises alone (the batch if none does)."""
    culprit = None
    for i in range(len(completions)):
        try:
            _invoke(reward.fn, call, prompts[i:i + 1], completions[i:i + 1], {k: v[i:i + 1] for k, v in kwargs.items()})
        except Exception:  # noqa: BLE001 - any exception marks the row
            culprit = i
            break
    if culprit is None:
        at = f"on a batch{_rows(where)}"
    else:
        row = where[culprit] if culprit < len(where) else culprit
        at = f"at dataset row {row} (prompt {str(prompts[culprit])[:60]!r})"
    return (f"reward `{reward.name}` raised {type(exc).__name__}: {_line(exc)} {at}: fix the function, or return "
            "None for rows it cannot score.")


def _as_list(out) -> list | None:
    if out is None or isinstance(out, (str, bytes, Mapping, Set)) or getattr(out, "ndim", 1) == 0:
        return None
    if hasattr(out, "tolist"):  # numpy arrays, tensors
        out = out.tolist()
    try:
        return list(out)
    except TypeError:
        return None


def _value(reward: Reward, value, row) -> float:
    if value is None:
        return math.nan
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy scalars, 0-d tensors
        value = value.item()
    if isinstance(value, numbers.Real):  # bool included: True is 1.0
        number = float(value)
        if math.isfinite(number):
            return number
        raise RewardError(f"reward `{reward.name}` returned {number} at dataset row {row}: return None to skip a row "
                          "(a reward must be a finite float).")
    what = f"the string {value[:40]!r}" if isinstance(value, str) else f"a {type(value).__name__}"
    raise RewardError(f"reward `{reward.name}` returned {what} at dataset row {row}: return a float per completion "
                      "(float(x) for a number in text), or None to skip the row.")


def _describe(out) -> str:
    if out is None:
        return "None (a missing return?)"
    if isinstance(out, numbers.Number) or getattr(out, "ndim", None) == 0:
        return f"a single number ({out})"
    return f"a {type(out).__name__}"


def _rows(where: list) -> str:
    unique = list(dict.fromkeys(where))
    return f" (dataset rows {', '.join(map(str, unique[:6]))}{', ...' if len(unique) > 6 else ''})" if unique else ""


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


# --- TRL, totals, workers ------------------------------------------------------------------------


def for_trl(rewards: list[Reward], prompt_texts: Mapping[str, str] | None = None) -> tuple[list[Callable], list[float]]:
    """`reward_funcs` and `reward_weights` for GRPOTrainer/GRPOConfig. Each function is named after its reward,
    drops TRL's own keyword arguments, reads the `_row` column for error messages and gives the user function
    `_prompt_text` (else `prompt_texts[prompt]`, else TRL's templated prompt) as `prompts`. Conversational
    prompts and completions (lists of messages) arrive as text: the last message's content."""
    return [_trl_func(r, prompt_texts) for r in rewards], [float(r.weight) for r in rewards]


def _trl_func(reward: Reward, prompt_texts):
    def reward_func(prompts=None, completions=None, **kwargs):
        for key in TRL_KWARGS:
            kwargs.pop(key, None)
        rows = kwargs.pop(ROW, None)
        texts = kwargs.pop(PROMPT_TEXT, None)
        prompts = [_text(p) for p in prompts or []]
        if texts is None:
            texts = [prompt_texts.get(p, p) for p in prompts] if prompt_texts else prompts
        return score(reward, list(texts), [_text(c) for c in completions or []], kwargs, rows)

    reward_func.__name__ = reward_func.__qualname__ = reward.name  # TRL's metric rewards/{name}/mean
    return reward_func


def _text(item):
    if isinstance(item, list) and item and all(isinstance(m, Mapping) for m in item):
        return str(item[-1].get("content", ""))
    return item


def combine(rewards: list[Reward], per_reward: list[list[float]]) -> list[float]:
    """The weighted total per completion, as TRL sums it: NaN terms are left out; all NaN gives NaN."""
    if len(per_reward) != len(rewards):
        raise ValueError(f"{len(per_reward)} score lists for {len(rewards)} rewards")
    totals = []
    for values in zip(*per_reward, strict=True):
        terms = [r.weight * v for r, v in zip(rewards, values) if not math.isnan(v)]
        totals.append(sum(terms) if terms else math.nan)
    return totals


def portable(reward) -> str | None:
    """"module:qualname" that imports this reward's function in another process; None for one defined in the
    notebook (`__main__`), a lambda, a closure (built-ins with their argument included), a partial or an instance."""
    fn = reward.fn if isinstance(reward, Reward) else reward
    module_name, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not isinstance(module_name, str) or not isinstance(qualname, str) or module_name == "__main__" \
            or module_name.startswith("<") or "<" in qualname:
        return None
    module = sys.modules.get(module_name)
    if module is None or getattr(module, "__spec__", None) is None:  # made by exec, not importable
        return None
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return f"{module_name}:{qualname}" if obj is fn else None


def to_spec(reward: Reward) -> str | None:
    """The `--reward` string that rebuilds `reward` (weight included) where the notebook is not; None if none
    does. The rebuilt reward's name may differ: keep `reward.name` alongside."""
    target = reward.spec if reward.builtin else portable(reward)
    return None if target is None else f"{target}:{reward.weight!r}"


def record_of(spec) -> str:
    """What run.json keeps of one `TrainArgs.rewards` entry: the spec string as given, the spec that
    rebuilds a Reward or an importable function, else the function's name (looked up in the notebook
    again on --resume)."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Reward):
        return to_spec(spec) or spec.spec or spec.name
    return portable(spec) or _name_of(spec)


def refuse_for_workers(rewards: list[Reward], gpus: int = 2) -> None:
    """Refuse rewards that `--gpus` worker processes cannot rebuild (defined in the notebook), with the fix."""
    stuck = [r for r in rewards if to_spec(r) is None]
    if stuck:
        names = ", ".join(f"`{r.name}`" for r in stuck)
        raise ConfigError(f"--gpus {gpus} scores rewards in worker processes, which cannot see the notebook: {names} "
                          f"{'is' if len(stuck) == 1 else 'are'} defined there (or a lambda/closure). Put the function "
                          f"in a .py module next to the notebook and pass --reward mymodule:{_name_of(stuck[0].fn)}; "
                          "built-ins such as exact:COLUMN work as they are.")
