"""Reading tables: inline text from a cell, files, and Python objects, all into a pandas DataFrame.

pandas does the parsing; this module picks the reader and turns parser errors into messages a
user can act on (which line, which file name was probably meant).
"""

from __future__ import annotations

import difflib
import io
import json
import re
from pathlib import Path

import pandas as pd

from ipylora.engine.errors import DatasetError

FILE_READERS = {
    ".csv": lambda path: _read_csv(path.read_text("utf-8"), f"{path.name}"),
    ".tsv": lambda path: _read_csv(path.read_text("utf-8"), f"{path.name}", sep="\t"),
    ".json": lambda path: _read_json(path.read_text("utf-8"), f"{path.name}"),
    ".jsonl": lambda path: _read_jsonl(path.read_text("utf-8"), f"{path.name}"),
    ".parquet": lambda path: pd.read_parquet(path),
}


def read_text(body: str, fmt: str | None = None) -> pd.DataFrame:
    """Parse a cell body: CSV, a JSON list of objects, or JSON lines (detected unless `fmt`)."""
    if not body.strip():
        raise DatasetError("The cell has no data: put CSV, a JSON list or JSON lines under the magic line.")
    fmt = fmt or _sniff(body)
    readers = {"csv": _read_csv, "tsv": lambda t, w: _read_csv(t, w, sep="\t"),
               "json": _read_json, "jsonl": _read_jsonl}
    if fmt not in readers:
        raise DatasetError(f"Unknown data format {fmt!r}: use one of {', '.join(readers)}.")
    return readers[fmt](body, "the cell")


def read_path(path_text: str) -> pd.DataFrame:
    """Read a csv, tsv, json, jsonl or parquet file."""
    path = Path(path_text).expanduser()
    if not path.exists():
        raise DatasetError(_missing_file_message(path))
    if path.is_dir():
        raise DatasetError(f"{path_text!r} is a folder: pass a data file inside it, e.g. {path_text}/train.csv.")
    reader = FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise DatasetError(
            f"Cannot read {path.name!r}: the extension {path.suffix or '(none)'} is not one of "
            f"{', '.join(FILE_READERS)}. Rename the file or convert it."
        )
    try:
        return reader(path)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path.name} is not UTF-8 text (byte {exc.start}): save it as UTF-8.") from None


def read_object(obj) -> pd.DataFrame:
    """A DataFrame, a list of dicts, or a dict of columns."""
    if isinstance(obj, pd.DataFrame):
        return obj.reset_index(drop=True)
    if isinstance(obj, list) and obj and all(isinstance(row, dict) for row in obj):
        return pd.DataFrame(obj)
    if isinstance(obj, dict) and obj and all(isinstance(col, (list, tuple)) for col in obj.values()):
        return pd.DataFrame(obj)
    raise DatasetError(
        f"Cannot use a {type(obj).__name__} as data: pass a pandas DataFrame, a list of dicts, "
        "or a path to a csv/json/jsonl/parquet file."
    )


def _sniff(body: str) -> str:
    start = body.lstrip()[:1]
    if start == "[":
        return "json"
    if start == "{":
        return "jsonl"
    return "csv"


def _read_csv(text: str, where: str, sep: str = ",") -> pd.DataFrame:
    try:
        frame = pd.read_csv(io.StringIO(text.strip("\n")), sep=sep, skipinitialspace=False)
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{where} has no rows: add a header line and at least one data row.") from None
    except pd.errors.ParserError as exc:
        match = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if not match:
            raise DatasetError(f"Could not parse {where} as CSV: {str(exc).strip()}") from None
        expected, line, saw = (int(g) for g in match.groups())
        content = text.strip("\n").splitlines()[line - 1] if line <= len(text.splitlines()) else ""
        raise DatasetError(
            f"CSV line {line} of {where} has {saw} fields but the header has {expected}: "
            f"{content[:60]!r}. Put quotes around fields that contain commas."
        ) from None
    if frame.empty:
        raise DatasetError(f"{where} has a header but no rows: add data rows under it.")
    return frame


def _read_json(text: str, where: str) -> pd.DataFrame:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"Invalid JSON in {where} at line {exc.lineno}, column {exc.colno}: {exc.msg}. Fix that spot."
        ) from None
    if isinstance(data, dict):  # {"data": [...]} or a dict of columns
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and lists:
            data = lists[0]
    try:
        return read_object(data)
    except DatasetError:
        raise DatasetError(f"{where} holds JSON but not a list of objects: use [{{\"col\": ...}}, ...].") from None


def _read_jsonl(text: str, where: str) -> pd.DataFrame:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"Invalid JSON on line {number} of {where}, column {exc.colno}: {exc.msg}. "
                "Each line must be one JSON object."
            ) from None
        if not isinstance(row, dict):
            raise DatasetError(f"Line {number} of {where} is not a JSON object: each line must be {{...}}.")
        rows.append(row)
    if not rows:
        raise DatasetError(f"{where} has no JSON lines.")
    return pd.DataFrame(rows)


def _missing_file_message(path: Path) -> str:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        return f"No file {str(path)!r}: the folder {str(folder)!r} does not exist either. Check the path."
    names = sorted(p.name for p in folder.iterdir())
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.5)
    hint = f" Did you mean {str(folder / close[0])!r}?" if close else f" The folder {str(folder)!r} has: {', '.join(names[:8]) or 'nothing'}."
    return f"No file {str(path)!r}.{hint}"
