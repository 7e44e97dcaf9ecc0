"""Side-by-side renderings: answers of several adapters to the same prompts, and evals of a run.

Plain functions that return `Rendered` (HTML in notebooks, text in terminals), like ui/render.py.
"""

from __future__ import annotations

import datetime
import html

from ipylora.ui.render import Rendered

CELL = "text-align:left;vertical-align:top;white-space:pre-wrap;max-width:36em"
MUTED = "color:#888;font-size:85%"


def _answer_note(answer: dict) -> str:
    return f"{answer['tokens']} tok" + ("" if answer["stopped_at_eos"] else ", no EOS")


def compare_table(result: dict, references: list[str] | None = None) -> Rendered:
    """One row per prompt, one column per adapter ("base" = no adapter), plus the reference if known.

    A dataset row's prompt is its last user turn; what came before it (a system prompt, earlier
    turns: `result["context"]`), which every adapter was sent too, is named under it.
    """
    names = result["adapters"]
    heads = ["prompt", *(["reference"] if references else []), *names]
    contexts = result.get("context") or [""] * len(result["prompts"])
    html_rows, text_rows = [], []
    for i, prompt in enumerate(result["prompts"]):
        before = f"<br><span style='{MUTED}'>after the {html.escape(contexts[i])}</span>" if contexts[i] else ""
        cells = [f"<td style='{CELL}'>{html.escape(prompt)}{before}</td>"]
        lines = [f"## {prompt}" + (f"  (after the {contexts[i]})" if contexts[i] else "")]
        if references:
            cells.append(f"<td style='{CELL};color:#0b5d1e'>{html.escape(references[i])}</td>")
            lines.append(f"  reference: {references[i]}")
        for name in names:
            answer = result["answers"][name][i]
            cells.append(f"<td style='{CELL}'>{html.escape(answer['text'])}"
                         f"<br><span style='{MUTED}'>{_answer_note(answer)}</span></td>")
            lines.append(f"  {name}: {answer['text']}  [{_answer_note(answer)}]")
        html_rows.append("<tr>" + "".join(cells) + "</tr>")
        text_rows.append("\n".join(lines))
    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in heads)
    return Rendered(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(html_rows)}</tbody></table>",
                    "\n".join(text_rows))


METRICS = [
    ("eval_loss", "eval loss", "{:.4f}"),
    ("perplexity", "perplexity", "{:.3g}"),
    ("exact_match", "exact match", "{:.1%}"),
    ("f1", "token F1", "{:.3f}"),
    ("rouge_l", "ROUGE-L", "{:.3f}"),
    ("eos_stop", "stops at EOS", "{:.1%}"),
    ("answer_tokens", "mean answer tokens", "{:.1f}"),
    ("preference_accuracy", "preference accuracy", "{:.1%}"),
    ("preference_margin", "preference margin", "{:+.3f}"),
]


def _eval_label(record: dict) -> str:
    when = datetime.datetime.fromtimestamp(record["time"]).strftime("%m-%d %H:%M")
    return f"{record['dataset']}:{record['split']} · {record['rows']} rows · {when}"


def eval_table(record: dict, history: list[dict], earlier: int = 4) -> Rendered:
    """The new eval beside up to `earlier` earlier ones of the same run, then its worst rows."""
    columns = history[-(earlier + 1):]
    head = "".join(f"<th style='text-align:left'>{html.escape(_eval_label(r))}"
                   f"{' (new)' if r is columns[-1] else ''}</th>" for r in columns)
    body, text_lines = [], [f"eval of {record['name']} ({record['model']}) on {_eval_label(record)}"]
    for key, label, fmt in METRICS:
        values = [fmt.format(r["metrics"][key]) if key in r["metrics"] else "-" for r in columns]
        body.append(f"<tr><th style='text-align:left'>{label}</th>"
                    + "".join(f"<td style='text-align:right'>{v}</td>" for v in values) + "</tr>")
        text_lines.append(f"{label:>20}: " + "  ".join(f"{v:>10}" for v in values))
    worst_html, worst_text = _worst(record["worst"])
    title = (f"<b>{html.escape(record['name'])}</b> on {html.escape(_eval_label(record))} "
             f"<span style='{MUTED}'>({html.escape(str(record['model']))}, saved to runs/…/eval.json)</span>")
    html_text = (f"<div>{title}<table><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
                 f"{worst_html}</div>")
    return Rendered(html_text, "\n".join(text_lines + worst_text))


def _worst(rows: list[dict]) -> tuple[str, list[str]]:
    if not rows:
        return "", []
    heads = ["row", "prompt", "reference", "answer", "ROUGE-L", "F1", "EOS"]
    cells = []
    lines = ["worst rows (lowest ROUGE-L):"]
    for r in rows:
        values = [str(r["row"]), r["prompt"], r["reference"], r["answer"], f"{r['rouge_l']:.2f}", f"{r['f1']:.2f}",
                  "yes" if r["stopped_at_eos"] else "no"]
        cells.append("<tr>" + "".join(f"<td style='{CELL}'>{html.escape(v)}</td>" for v in values) + "</tr>")
        lines.append(f"  #{r['row']} rouge-L {r['rouge_l']:.2f}: {r['prompt']!r} -> {r['answer']!r} "
                     f"(expected {r['reference']!r})")
    head = "".join(f"<th style='text-align:left'>{h}</th>" for h in heads)
    return (f"<details><summary>worst {len(rows)} rows (lowest ROUGE-L)</summary><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(cells)}</tbody></table></details>", lines)


def preference_line(record: dict) -> str | None:
    """The one-line preference result of an eval on preference data (None for SFT data)."""
    found = record.get("preference")
    if not found:
        return None
    if "note" in found:
        return f"preference accuracy: - ({found['note']})"
    reference = "the base (adapters disabled)" if found["reference"] == "base" else f"adapter {found['reference']}"
    if found["paired"]:
        what = (f"{round(found['accuracy'] * found['rows'])} of {found['rows']} pairs where the adapter prefers "
                f"chosen to rejected more than its reference, {reference}")
        margin = "mean margin {:+.3f} (log-ratio difference, beta-free".format(found["margin"])
    else:
        what = (f"{round(found['accuracy'] * found['rows'])} of {found['rows']} rows whose log-ratio against its "
                f"reference, {reference}, has the label's sign")
        margin = "mean margin {:+.3f} (desirable minus undesirable log-ratio, beta-free".format(found["margin"])
    if found.get("reward_margin") is not None:
        margin += f"; x the run's beta {found['beta']:g}: reward margin {found['reward_margin']:+.3f}"
    left = f"; {found['left_out']} left out: longer than --max-length" if found.get("left_out") else ""
    return f"preference accuracy: {found['accuracy']:.3f} ({what}); {margin}){left}"
