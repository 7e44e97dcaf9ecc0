"""The dataset preview: what `%%lora_dataset` shows, as HTML with a plain-text twin.

A table of the first rows; rendered samples where the tokens that carry loss are highlighted and
prompt tokens are grey; a token-length histogram with the --max-length cut line and the count
and share of rows that will be truncated; warnings. The numbers come from `engine.stats`.
Preference data shows each sample's prompt above its chosen and rejected answers side by side
(unpaired data: the completion and its label), each with its token count.
"""

from __future__ import annotations

import html
import statistics

from ipylora.engine.stats import DatasetStats, PreferenceStats, dataset_stats
from ipylora.ui.render import Rendered

GREY = "color:#888"
LOSS = "background:#dff3e3;color:#0b5d1e"
TABLE_ROWS = 5
CELL_CHARS = 80


def dataset_preview(dataset, tokenizer, tokenizer_name: str, max_length: int, samples: int = 3) -> Rendered:
    stats = dataset_stats(dataset, tokenizer, tokenizer_name, max_length, samples=samples)
    if isinstance(stats, PreferenceStats):
        return render_preference_preview(dataset, stats)
    return render_preview(dataset, stats)


def _header(dataset, stats: DatasetStats) -> tuple[str, str]:
    mapping = dataset.mapping
    split = f" + {stats.eval_rows} eval" if stats.eval_rows else ""
    head = f"{dataset.name}: {stats.rows} rows{split}, columns {', '.join(dataset.columns)}"
    fields = ", ".join(f"{k}={v}" for k, v in mapping.fields.items())
    return head, f"format {mapping.format.name} ({fields}), template {dataset.template.name}"


def _length_line(stats: DatasetStats, unit: str = "row") -> str:
    lengths = stats.lengths
    measured = "" if not stats.estimated else f", measured on {stats.measured:,} sampled rows"
    approx = "≈" if stats.estimated else ""
    return (f"tokens per {unit} ({stats.tokenizer}{measured}): min {min(lengths)}, median "
            f"{statistics.median(lengths):g}, max {max(lengths)}; {approx}{stats.over} row(s) "
            f"({stats.over_share:.1%}) over --max-length {stats.max_length}")


def _notices(stats: DatasetStats) -> tuple[str, str]:
    """(warnings HTML, notes HTML)."""
    return ("".join(f'<div style="color:#9a5b00">⚠ {html.escape(w)}</div>' for w in stats.warnings),
            "".join(f'<div style="color:#1f4e8c">ⓘ {html.escape(n)}</div>' for n in stats.notes))


def render_preference_preview(dataset, stats: PreferenceStats) -> Rendered:
    """Preference data: each sample's prompt (grey) over its answers (green, the tokens scored) side by side."""
    head, how = _header(dataset, stats)
    if stats.kind != "preference":
        desirable = sum(r.label for r in dataset.preference_rows())
        how += f"; {desirable} desirable (label true), {stats.rows - desirable} undesirable"
    medians = ", ".join(f"{name} {statistics.median(values):g}" for name, values in stats.part_lengths.items())
    unit = "row (prompt + the longer answer)" if stats.kind == "preference" else "row (prompt + completion)"
    length_line = _length_line(stats, unit) + f"; median tokens: {medians}"
    cell = 'style="vertical-align:top;border:1px solid #ddd;padding:4px;width:{}%"'
    pre = '<pre style="white-space:pre-wrap;margin:0">{}</pre>'
    sample_html, sample_text = [], []
    for sample in stats.pairs:
        note = {"start": f"prompt cut from the start to fit {stats.max_length} tokens",
                "dropped": f"left out: the answers alone are longer than {stats.max_length} tokens"}.get(sample.cut, "")
        more = f'<span style="color:#b00">… {note}</span>' if note else ""
        width = 100 // len(sample.answers)
        titles = "".join(f"<th {cell.format(width)}>{html.escape(t)} · {n} tokens</th>" for t, _, n in sample.answers)
        answers = "".join(f'<td {cell.format(width)}>{pre.format(_span(text, LOSS))}</td>' for _, text, _ in sample.answers)
        prompt = pre.format(more + _span(sample.prompt, GREY))
        sample_html.append(
            f'<table style="width:100%;table-layout:fixed;border-collapse:collapse;margin:4px 0">'
            f'<tr><td colspan="{len(sample.answers)}" {cell.format(100)}><small>row {sample.row + 1} · prompt · '
            f'{sample.prompt_tokens} tokens</small>{prompt}</td></tr><tr>{titles}</tr><tr>{answers}</tr></table>')
        parts = ", ".join(f"{t} {n}" for t, _, n in sample.answers)
        sample_text.append(f"--- sample {sample.row + 1}: prompt {sample.prompt_tokens} tokens, {parts}"
                           + (f" ({note})" if note else "") + "\n" + sample.prompt
                           + "".join(f"\n[{t}] {text}" for t, text, _ in sample.answers))
    legend = (f'<span style="{GREY}">grey: prompt</span> · '
              f'<span style="{LOSS}">green: the answer tokens scored (answer + EOS)</span>')
    warnings_html, notes_html = _notices(stats)
    html_text = (
        f"<div><b>{html.escape(head)}</b><br><small>{html.escape(how)}</small>{notes_html}"
        f"{_table(rows_frame(dataset), total=len(dataset.frame))}{legend}{''.join(sample_html)}"
        f"{_histogram(stats.lengths, stats.max_length)}<div><small>{html.escape(length_line)}</small></div>"
        f"{warnings_html}</div>"
    )
    text = "\n".join([head, how, *sample_text, length_line, *(f"warning: {w}" for w in stats.warnings)])
    return Rendered(html_text, text)


def _span(text: str, style: str) -> str:
    return f'<span style="{style}">{html.escape(text)}</span>'


def render_preview(dataset, stats: DatasetStats) -> Rendered:
    head, how = _header(dataset, stats)
    lengths = stats.lengths
    length_line = _length_line(stats)

    sample_html, sample_text = [], []
    for i, (runs, cut) in enumerate(zip(stats.samples, stats.truncated_samples)):
        body = "".join(f'<span style="{LOSS if trained else GREY}">{html.escape(text)}</span>' for text, trained in runs)
        note = {"start": f"prompt cut from the start to fit {stats.max_length} tokens",
                "end": f"cut at {stats.max_length} tokens", "dropped": "left out: the answer alone is longer than "
                f"{stats.max_length} tokens"}.get(cut, "")
        more = f'<span style="color:#b00">… {note}</span>' if note else ""
        sample_html.append(f'<pre style="white-space:pre-wrap;margin:4px 0;padding:6px;border:1px solid #ddd">'
                           f"{more if cut == 'start' else ''}{body}{more if cut != 'start' else ''}</pre>")
        runs_text = "".join(f"[{t}]" if trained else t for t, trained in runs)
        sample_text.append(f"--- sample {i + 1} ([...] = trained)" + (f" ({note})" if note else "") + "\n" + runs_text)
    legend = (f'<span style="{GREY}">grey: prompt, no loss</span> · '
              f'<span style="{LOSS}">green: trained on (responses + EOS)</span>')
    warnings_html, notes_html = _notices(stats)
    html_text = (
        f"<div><b>{html.escape(head)}</b><br><small>{html.escape(how)}</small>{notes_html}"
        f"{_table(rows_frame(dataset), total=len(dataset))}{legend}{''.join(sample_html)}"
        f"{_histogram(lengths, stats.max_length)}<div><small>{html.escape(length_line)}</small></div>"
        f"{warnings_html}</div>"
    )
    text = "\n".join([head, how, *(f"note: {n}" for n in stats.notes), *sample_text, length_line,
                      *(f"warning: {w}" for w in stats.warnings)])
    return Rendered(html_text, text)


def head_table(frame, total: int | None, where: str) -> Rendered:
    """`--head`: the first rows of a file and its row count when known."""
    count = f"{total:,} rows" if total is not None else "row count unknown without reading it all"
    head = f"{where}: {count}, columns {', '.join(map(str, frame.columns))}"
    return Rendered(f"<div><b>{html.escape(head)}</b>{_table(frame, len(frame))}</div>",
                    head + "\n" + frame.to_string(max_colwidth=CELL_CHARS))


def rows_frame(dataset, rows: int = TABLE_ROWS):
    """The first rows as the preview's table shows them: a chat format (messages, sharegpt) as its
    system prompt, last user turn and answer rather than the repr of a list of dicts."""
    import pandas as pd

    if dataset.is_preference:
        return _preference_frame(dataset, rows)
    if dataset.mapping.format.name not in ("messages", "sharegpt"):
        return dataset.frame.head(rows)
    shown = []
    for row in range(min(rows, len(dataset))):
        conv = dataset.conversations()[row]
        prompt = dataset.prompt_messages(row)
        users = [m["content"] for m in prompt if m["role"] == "user"]
        answer = next(m["content"] for m in conv[len(prompt):] if m["role"] == "assistant")
        shown.append({"system": "\n\n".join(m["content"] for m in prompt if m["role"] == "system"),
                      "user (last turn)": users[-1] if users else "", "assistant": answer,
                      "turns": sum(m["role"] == "assistant" for m in conv)})
    frame = pd.DataFrame(shown)
    if not frame["system"].str.len().any():
        frame = frame.drop(columns="system")
    if (frame["turns"] == 1).all():
        frame = frame.drop(columns="turns")
    return frame


def _preference_frame(dataset, rows: int):
    """Preference rows as system, the last user turn, and the answers' text (or completion and label)."""
    import pandas as pd

    def text(messages, role):
        return "\n\n".join(m["content"] for m in messages if m["role"] == role)

    shown = []
    for r in dataset.preference_rows()[:rows]:
        users = [m["content"] for m in r.prompt if m["role"] == "user"]
        row = {"system": text(r.prompt, "system"), "prompt (last user turn)": users[-1] if users else ""}
        if hasattr(r, "chosen"):
            row.update(chosen=text(r.chosen, "assistant"), rejected=text(r.rejected, "assistant"))
        else:
            row.update(completion=text(r.completion, "assistant"), label=r.label)
        shown.append(row)
    frame = pd.DataFrame(shown)
    return frame if frame["system"].str.len().any() else frame.drop(columns="system")


def _table(frame, rows: int = TABLE_ROWS, total: int | None = None) -> str:
    shown = frame.head(rows).copy()
    for column in shown.columns:
        shown[column] = shown[column].map(lambda v: _short(v))
    total = len(frame) if total is None else total
    more = f"<small>… {total - rows:,} more rows</small>" if total > rows else ""
    return f'<div style="overflow-x:auto;margin:6px 0">{shown.to_html(index=True, escape=True)}{more}</div>'


def _short(value) -> str:
    text = str(value.tolist() if hasattr(value, "tolist") else value)
    return text if len(text) <= CELL_CHARS else text[: CELL_CHARS - 1] + "…"


def _histogram(lengths: list[int], max_length: int, bins: int = 30, width: int = 420, height: int = 90) -> str:
    """An inline SVG histogram of token lengths (rows per bin on the left axis) with a red line at --max-length."""
    top = max(max(lengths), max_length) * 1.05
    step = top / bins
    counts = [0] * bins
    for length in lengths:
        counts[min(int(length / step), bins - 1)] += 1
    peak = max(counts) or 1
    left = 8 + 6 * len(str(peak))  # room for the count labels
    plot_w = width - left
    bar_w = plot_w / bins
    bars = "".join(
        f'<rect x="{left + i * bar_w:.1f}" y="{height - c / peak * height:.1f}" width="{bar_w - 1:.1f}" '
        f'height="{c / peak * height:.1f}" fill="{"#d9822b" if (i + 1) * step > max_length else "#4c78a8"}">'
        f'<title>{int(i * step)}-{int((i + 1) * step)} tokens: {c} row(s)</title></rect>'
        for i, c in enumerate(counts) if c
    )
    x = left + max_length / top * plot_w
    axis = (f'<line x1="{left - 2}" x2="{left - 2}" y1="0" y2="{height}" stroke="#888"/>'
            f'<text x="{left - 5}" y="9" font-size="10" text-anchor="end">{peak}</text>'
            f'<text x="{left - 5}" y="{height}" font-size="10" text-anchor="end">0</text>'
            f'<text x="{left - 5}" y="{height / 2 + 3:.0f}" font-size="9" text-anchor="end" fill="#666">rows</text>')
    return (f'<svg width="{width}" height="{height + 14}" style="margin-top:6px" role="img" '
            f'aria-label="token length histogram: rows per token length">{axis}{bars}'
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{height}" stroke="#c00" stroke-dasharray="3,2"/>'
            f'<text x="{min(x + 3, width - 90):.1f}" y="10" font-size="10" fill="#c00">max-length {max_length}</text>'
            f'<text x="{left}" y="{height + 12}" font-size="10">0</text>'
            f'<text x="{width - 40}" y="{height + 12}" font-size="10">{int(top)} tok</text></svg>')
