"""HTML and text renderings of engine objects: dataset previews, status tables.

Plain functions that return strings; the magics wrap them in display objects. Every rendering
has a text twin so the same magic reads well in a terminal IPython.
"""

from __future__ import annotations

import html
import statistics

GREY = "color:#888"
LOSS = "background:#dff3e3;color:#0b5d1e"


class Rendered:
    """An object IPython displays as HTML in notebooks and as text in terminals."""

    def __init__(self, html_text: str, text: str):
        self._html, self._text = html_text, text

    def _repr_html_(self) -> str:
        return self._html

    def __repr__(self) -> str:
        return self._text


def dataset_preview(dataset, tokenizer, tokenizer_name: str, max_length: int, samples: int = 3) -> Rendered:
    """Row count, columns, `samples` rendered examples with loss tokens highlighted, token lengths."""
    tokens = dataset.tokenize(tokenizer, max_length=10**9)
    lengths = [len(ids) for ids in tokens["input_ids"]]
    over = sum(n > max_length for n in lengths)
    stats = (f"tokens per row ({tokenizer_name}): min {min(lengths)}, median {statistics.median(lengths):g}, "
             f"max {max(lengths)}" + (f"; {over} row(s) over --max-length {max_length} will be truncated" if over else ""))
    head = f"{dataset.name}: {len(dataset)} rows, columns {', '.join(dataset.columns)}"
    mapping = f"prompt {dataset.prompt_format!r} -> response {dataset.response_format!r}, template {dataset.template.name}"
    parts, text_parts = [], []
    for i in range(min(samples, len(dataset))):
        segments = _segments(tokenizer, tokens["input_ids"][i], tokens["labels"][i])
        body = "".join(
            f'<span style="{LOSS if trained else GREY}">{html.escape(text)}</span>' for text, trained in segments
        )
        parts.append(f'<pre style="white-space:pre-wrap;margin:4px 0;padding:6px;border:1px solid #ddd">{body}</pre>')
        text_parts.append("".join(f"[{t}]" if trained else t for t, trained in segments))
    legend = (f'<span style="{GREY}">grey: prompt, no loss</span> · '
              f'<span style="{LOSS}">green: trained on (response + EOS)</span>')
    html_text = (f"<div><b>{html.escape(head)}</b><br><small>{html.escape(mapping)}</small>"
                 f"<br>{legend}{''.join(parts)}<small>{html.escape(stats)}</small></div>")
    text = "\n".join([head, mapping, *(f"--- sample {i + 1} ([...] = trained)\n{t}" for i, t in enumerate(text_parts)), stats])
    return Rendered(html_text, text)


def _segments(tokenizer, input_ids, labels):
    """Consecutive runs of (decoded text, carries loss?)."""
    runs, current, flag = [], [], None
    for token, label in zip(input_ids, labels):
        trained = label != -100
        if flag is not None and trained != flag:
            runs.append((tokenizer.decode(current), flag))
            current = []
        current.append(token)
        flag = trained
    if current:
        runs.append((tokenizer.decode(current), flag))
    return runs


def status_table(snapshot: dict, extra: dict) -> Rendered:
    """%lora_status: model, device, dtype, quantization, memory, datasets, adapters."""
    model = snapshot["model"] or {}
    rows = [
        ("model", model.get("id", "not loaded (loads on first %lora_train or %lora_chat)")),
        ("device", model.get("device", "-")),
        ("dtype", model.get("dtype", "-")),
        ("quantization", model.get("quantization") or "none"),
        ("memory", model.get("memory", "-")),
        ("process memory", extra.get("rss", "-")),
        ("datasets", ", ".join(f"{d['name']} ({d['rows']} rows)" for d in snapshot["datasets"]) or "none"),
        ("adapters", ", ".join(a["name"] + (" (active)" if a["active"] else "") for a in snapshot["adapters"]) or "none"),
        ("ipylora", snapshot["version"]),
    ]
    html_rows = "".join(f"<tr><th style='text-align:left'>{k}</th><td style='text-align:left'>{html.escape(str(v))}</td></tr>"
                        for k, v in rows)
    return Rendered(f"<table>{html_rows}</table>", "\n".join(f"{k:>15}: {v}" for k, v in rows))


def table(rows: list[dict], columns: list[str]) -> Rendered:
    """A list of dicts as an HTML table (and aligned text)."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    widths = {c: max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return Rendered(f"<table><tr>{head}</tr>{body}</table>", "\n".join(lines))
