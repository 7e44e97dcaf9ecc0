"""Where data comes from: a cell body, files and globs, Python objects, the Hugging Face Hub.

Everything ends as a pandas DataFrame, or a dict of DataFrames by split (a `DatasetDict`). The
parsing itself is done by the readers in the `ipylora.readers` entry-point group (readers.py);
this module picks one and turns "not found" into a message that suggests what was meant.

A `.jsonl` file that holds a JSON array (or a `.json` file of JSON lines) is read by what it holds,
and the frame says so in `frame.attrs["notes"]` (`notes(data)`): the engine never prints, so a
front end shows those lines.
"""

from __future__ import annotations

import difflib
import glob
import re
import socket
from pathlib import Path

import pandas as pd

from ipylora.engine import plugins
from ipylora.engine.errors import DatasetError
from ipylora.engine.readers import BOM, json_layout

HUB_PREFIX = "hf:"


def readers() -> list:
    return plugins.all_of(plugins.READERS)


def reader_named(name: str):
    reader = plugins.get(plugins.READERS, name)
    if reader is None:
        known = [r.name for r in readers()]
        raise DatasetError(f"Unknown reader {name!r}: use one of {', '.join(known)}.")
    return reader


def text_reader_names() -> list[str]:
    return [r.name for r in readers() if r.read_text is not None]


def notes(data) -> list[str]:
    """One-line notes about how `data` (a DataFrame or a dict of them by split) was read."""
    frames = data.values() if isinstance(data, dict) else [data]
    return [note for frame in frames for note in getattr(frame, "attrs", {}).get("notes", [])]


def read_text(body: str, fmt: str | None = None) -> pd.DataFrame:
    """Parse a cell body: CSV, TSV, a JSON list, JSON lines or YAML (detected unless `fmt`)."""
    body = body.removeprefix(BOM)  # pasted from a file saved with one
    if not body.strip():
        raise DatasetError("The cell has no data: put CSV, JSON, JSON lines or YAML under the magic line.")
    name = fmt or _sniff(body)
    reader = plugins.get(plugins.READERS, name)
    if reader is None or reader.read_text is None:
        raise DatasetError(f"Unknown data format {name!r} for a cell: use one of {', '.join(text_reader_names())}.")
    return reader.read_text(body, "the cell")


def read_path(path_text: str, reader: str | None = None):
    """Read a file, a `save_to_disk` folder, or every file matching a glob pattern."""
    if glob.has_magic(path_text):
        matches = sorted(glob.glob(str(Path(path_text).expanduser()), recursive=True))
        files = [m for m in matches if Path(m).is_file() or _folder_reader(Path(m))]
        if not files:
            raise DatasetError(f"No files match {path_text!r}: check the pattern (e.g. data/*.jsonl).")
        frames = [_as_frame(read_path(f, reader), f) for f in files]
        columns = [list(f.columns) for f in frames]
        if any(set(c) != set(columns[0]) for c in columns):
            odd = next(f for f, c in zip(files, columns) if set(c) != set(columns[0]))
            raise DatasetError(f"{Path(odd).name} has columns {', '.join(map(str, frames[files.index(odd)].columns))}, "
                               f"unlike {Path(files[0]).name} ({', '.join(map(str, columns[0]))}): "
                               "narrow the pattern or rename the columns.")
        combined = pd.concat(frames, ignore_index=True)
        combined.attrs["notes"] = [note for frame in frames for note in notes(frame)]
        return combined
    path = Path(path_text).expanduser()
    if not path.exists():
        raise DatasetError(_missing_file_message(path))
    if path.is_dir():
        folder_reader = _folder_reader(path)
        if folder_reader is None:
            inside = sorted(p.name for p in path.iterdir())[:6]
            raise DatasetError(f"{path_text!r} is a folder but not a datasets.save_to_disk folder: pass a file inside "
                               f"it ({', '.join(inside) or 'it is empty'}) or a pattern like {path_text}/*.jsonl.")
        return read_object(folder_reader.read_path(path))
    chosen = reader_named(reader) if reader else _reader_for(path)
    if path.stat().st_size == 0:
        raise DatasetError(f"{path.name} is empty: add a header line and at least one data row.")
    note = None
    if reader is None:
        chosen, note = _by_content(path, chosen)
    data = read_object(chosen.read_path(path), path.name)
    if note:
        data.attrs["notes"] = [*data.attrs.get("notes", []), note]
    return data


def read_object(obj, where: str | None = None):
    """A DataFrame, a datasets Dataset/DatasetDict, a list of dicts, or a dict of columns."""
    if isinstance(obj, pd.DataFrame):
        if obj.empty:
            raise DatasetError(f"{where or 'The DataFrame'} has no rows: add at least one.")
        return obj.reset_index(drop=True)
    module = type(obj).__module__ or ""
    if module.startswith("datasets"):
        if hasattr(obj, "to_pandas"):
            return read_object(obj.to_pandas(), where)
        if hasattr(obj, "keys"):  # DatasetDict / IterableDatasetDict
            return {str(split): read_object(obj[split].to_pandas(), f"split {split!r}") for split in obj.keys()}
    if isinstance(obj, list) and obj and all(isinstance(row, dict) for row in obj):
        return pd.DataFrame(obj)
    if isinstance(obj, dict) and obj and all(isinstance(col, (list, tuple)) for col in obj.values()):
        try:
            return pd.DataFrame(obj)
        except ValueError:
            raise DatasetError("The dict's columns have different lengths: give every column one value per row.") from None
    if isinstance(obj, dict) and obj and all(isinstance(v, pd.DataFrame) for v in obj.values()):
        return {str(k): read_object(v, f"split {k!r}") for k, v in obj.items()}
    if isinstance(obj, list) and not obj:
        raise DatasetError("The list is empty: add at least one row (a dict per row).")
    raise DatasetError(
        f"Cannot use a {type(obj).__name__} as data: pass a pandas DataFrame, a datasets.Dataset or DatasetDict, "
        "a list of dicts, or a path to a csv/tsv/json/jsonl/yaml/parquet/arrow file."
    )


def resolve(spec: str, namespace: dict | None = None, reader: str | None = None):
    """Read `--from SPEC`: a variable in `namespace`, a path or glob, or a hub id (`hf:name` or `owner/name`)."""
    namespace = namespace or {}
    if spec.startswith(HUB_PREFIX):
        return load_hub(spec[len(HUB_PREFIX):])
    if spec in namespace:
        return read_object(namespace[spec], spec)
    if glob.has_magic(spec) or Path(spec).expanduser().exists():
        return read_path(spec, reader)
    path = Path(spec)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not path.suffix and not path.parent.exists():
        return load_hub(spec)
    if spec.isidentifier():
        data_vars = sorted(k for k, v in namespace.items() if not k.startswith("_") and _looks_like_data(v))
        close = difflib.get_close_matches(spec, list(namespace), n=1)
        hint = (f" Did you mean {close[0]!r}?" if close else
                f" Variables holding data: {', '.join(data_vars[:8])}." if data_vars else "")
        raise DatasetError(f"No variable, file or folder named {spec!r}.{hint} For a hub dataset write hf:{spec}.")
    return read_path(spec, reader)


def load_hub(dataset_id: str):
    """datasets.load_dataset(dataset_id), with one-line messages when the hub cannot be reached."""
    import datasets

    split = None
    match = re.fullmatch(r"(.+)\[(\w+)\]", dataset_id)
    if match:
        dataset_id, split = match.groups()
    offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
    local = Path(dataset_id).expanduser().exists()  # load_dataset also reads local folders and scripts
    if not (offline or local) and not _hub_reachable():
        raise DatasetError(
            f"Cannot reach the Hugging Face Hub to load {dataset_id!r} (no network here). On a machine with one, run "
            f"datasets.load_dataset({dataset_id!r}).save_to_disk('FOLDER'), copy FOLDER here and pass --from FOLDER."
        )
    try:
        loaded = datasets.load_dataset(dataset_id, split=split)
    except (ConnectionError, OSError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DatasetError(
            f"Could not load {dataset_id!r} from the Hugging Face Hub ({text[:120]}). Without a hub, save it with "
            f"datasets.load_dataset({dataset_id!r}).save_to_disk('FOLDER') elsewhere and pass --from FOLDER."
        ) from None
    except ValueError as exc:  # unknown split and similar
        raise DatasetError(f"datasets.load_dataset({dataset_id!r}) failed: {str(exc).splitlines()[0]}") from None
    return read_object(loaded, dataset_id)


def peek(spec: str, n: int = 5, namespace: dict | None = None) -> tuple[pd.DataFrame, int | None]:
    """(first n rows, total rows if cheap to know) without reading the whole file when possible."""
    path = Path(spec).expanduser()
    if path.is_file():
        reader, _ = _by_content(path, _reader_for(path))
        if reader.head is not None:
            try:
                return reader.head(path, n)
            except UnicodeDecodeError:
                pass
    data = resolve(spec, namespace)
    frame = data.get("train", next(iter(data.values()))) if isinstance(data, dict) else data
    return frame.head(n), len(frame)


def _hub_reachable() -> bool:
    """A quick DNS check, so a machine without network fails in milliseconds, not after retries."""
    import os

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy resolves names
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0].split(":")[0]
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _looks_like_data(value) -> bool:
    module = type(value).__module__ or ""
    return isinstance(value, pd.DataFrame) or module.startswith("datasets.") or (
        isinstance(value, list) and bool(value) and isinstance(value[0], dict))


def _sniff(body: str) -> str:
    text = body.lstrip()
    start = text[:1]
    if start == "[":
        return "json"
    if start == "{":
        return "jsonl"
    first = text.splitlines()[0] if text else ""
    if first.startswith("- ") or first == "-" or (re.match(r"^[\w\s-]+:(\s|$)", first) and "," not in first):
        return "yaml"
    if "\t" in first and "," not in first:
        return "tsv"
    return "csv"


def _by_content(path: Path, reader):
    """(reader, note): JSON and JSON lines are told apart by content, not by the extension."""
    if reader.name not in ("json", "jsonl"):
        return reader, None
    layout = json_layout(path)
    if layout is None or layout == reader.name:
        return reader, None
    if layout == "json":
        note = (f"{path.name} holds a JSON array, not JSON lines, so it was read as JSON "
                f"(rename it {path.stem}.json or pass --reader json to skip this note).")
    else:
        note = (f"{path.name} holds JSON lines (one object per line), not one JSON document, so it was read as "
                f"JSON lines (rename it {path.stem}.jsonl or pass --reader jsonl to skip this note).")
    return reader_named(layout), note


def _folder_reader(path: Path):
    return next((r for r in readers() if r.is_folder is not None and r.is_folder(path)), None)


def _reader_for(path: Path):
    name = path.name.lower()
    for _ in range(2):
        for reader in readers():
            if any(name.endswith(suffix) for suffix in reader.suffixes):
                return reader
        plugins.rescan(plugins.READERS)  # a reader plugin installed since the last look?
    known = sorted(s for r in readers() for s in r.suffixes)
    raise DatasetError(
        f"Cannot read {path.name!r}: the extension {path.suffix or '(none)'} is not one of {', '.join(known)}. "
        "Rename the file, convert it, or pass --reader NAME."
    )


def _as_frame(data, where: str) -> pd.DataFrame:
    if isinstance(data, dict):
        return data.get("train", next(iter(data.values())))
    return data


def _missing_file_message(path: Path) -> str:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        return f"No file {str(path)!r}: the folder {str(folder)!r} does not exist either. Check the path."
    names = sorted(p.name for p in folder.iterdir())
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.5)
    hint = (f" Did you mean {str(folder / close[0])!r}?" if close
            else f" The folder {str(folder)!r} has: {', '.join(names[:8]) or 'nothing'}.")
    return f"No file {str(path)!r}.{hint}"
