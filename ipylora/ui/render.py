"""HTML and text renderings of engine objects: dataset previews, status tables.

Plain functions that return strings; the magics wrap them in display objects. Every rendering
has a text twin so the same magic reads well in a terminal IPython.
"""

from __future__ import annotations

import html


class Rendered:
    """An object IPython displays as HTML in notebooks and as text in terminals."""

    def __init__(self, html_text: str, text: str):
        self._html, self._text = html_text, text

    def _repr_html_(self) -> str:
        return self._html

    def __repr__(self) -> str:
        return self._text


def dataset_preview(dataset, tokenizer, tokenizer_name: str, max_length: int, samples: int = 3) -> Rendered:
    """The dataset preview (ipylora.ui.preview): table, samples with loss spans, length histogram, warnings."""
    from ipylora.ui.preview import dataset_preview as preview

    return preview(dataset, tokenizer, tokenizer_name, max_length, samples)


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
