"""Files as editors save them: a UTF-8 byte-order mark, and JSON vs JSON lines under the other extension.

Each file is written twice, clean and with a BOM (what Windows editors write); both must give the
same rows and column names, through the engine API and through `%%lora_dataset` / `--from`.
"""

import json

import pandas as pd
import pytest
import yaml

from ipylora.engine import DatasetError, Session
from ipylora.engine.sources import notes, peek, read_path, read_text, resolve
from support import ipython_shell

BOM = b"\xef\xbb\xbf"
ROWS = [{"prompt": "describe Käse", "response": "a wheel of cheese, warm light"},
        {"prompt": "describe a cat", "response": "whiskers; soft fur"},
        {"prompt": "describe rain", "response": "grey sky, \"wet\" streets"}]
CLEAN = pd.DataFrame(ROWS)


def _texts() -> dict[str, str]:
    return {
        "csv": CLEAN.to_csv(index=False),
        "tsv": CLEAN.to_csv(index=False, sep="\t"),
        "json": json.dumps(ROWS, indent=2, ensure_ascii=False),
        "jsonl": "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ROWS),
        "yaml": yaml.safe_dump(ROWS, allow_unicode=True, sort_keys=False),
    }


@pytest.fixture
def files(tmp_path):
    """{reader: (clean path, BOM path)} for every text reader."""
    out = {}
    for kind, text in _texts().items():
        clean, bom = tmp_path / f"clean.{kind}", tmp_path / f"bom.{kind}"
        clean.write_bytes(text.encode("utf-8"))
        bom.write_bytes(BOM + text.encode("utf-8"))
        out[kind] = clean, bom
    return out


@pytest.mark.parametrize("kind", ["csv", "tsv", "json", "jsonl", "yaml"])
def test_bom_file_reads_like_the_clean_file(files, kind):
    clean, bom = files[kind]
    frame = read_path(str(bom))
    assert list(frame.columns) == ["prompt", "response"]
    pd.testing.assert_frame_equal(frame, read_path(str(clean)))
    pd.testing.assert_frame_equal(frame, CLEAN)
    assert notes(frame) == []


@pytest.mark.parametrize("kind", ["csv", "tsv", "json", "jsonl", "yaml"])
def test_bom_cell_body_reads_like_the_clean_body(kind):
    text = _texts()[kind]
    pd.testing.assert_frame_equal(read_text("\ufeff" + text), CLEAN)  # format detected
    pd.testing.assert_frame_equal(read_text("\ufeff" + text, kind), CLEAN)  # format forced


def test_bom_head_peeks_clean_columns(files):
    for kind in ("csv", "tsv", "jsonl"):
        frame, _ = peek(str(files[kind][1]), 2)
        assert list(frame.columns) == ["prompt", "response"], kind
        assert frame["prompt"].tolist() == ["describe Käse", "describe a cat"], kind


def test_json_array_in_jsonl_and_json_lines_in_json_are_read_by_content(tmp_path):
    array, lines = tmp_path / "data.jsonl", tmp_path / "data.json"
    array.write_text(_texts()["json"], encoding="utf-8")
    lines.write_bytes(BOM + _texts()["jsonl"].encode("utf-8"))
    from_array = resolve(str(array))
    pd.testing.assert_frame_equal(from_array, CLEAN)
    (note,) = notes(from_array)
    assert "data.jsonl holds a JSON array" in note and "--reader json" in note and "\n" not in note
    from_lines = resolve(str(lines))
    pd.testing.assert_frame_equal(from_lines, CLEAN)
    (note,) = notes(from_lines)
    assert "data.json holds JSON lines" in note and "--reader jsonl" in note and "\n" not in note
    # A forced reader is taken at its word: no note, and its own error when the content disagrees.
    assert notes(resolve(str(array), reader="json")) == []
    with pytest.raises(DatasetError, match="holds a JSON array, not JSON lines.*--reader json"):
        resolve(str(array), reader="jsonl")
    # A glob keeps every file's note.
    assert len(notes(resolve(str(tmp_path / "data.*")))) == 2


def test_matching_content_gets_no_note(tmp_path):
    (tmp_path / "one.jsonl").write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")  # one line: still JSON lines
    (tmp_path / "obj.json").write_text(json.dumps({"data": ROWS}, indent=2), encoding="utf-8")  # pretty object
    (tmp_path / "flat.json").write_text(json.dumps({"data": ROWS}), encoding="utf-8")  # one-line object
    for name in ("one.jsonl", "obj.json", "flat.json"):
        frame = resolve(str(tmp_path / name))
        assert notes(frame) == [] and list(frame.columns) == ["prompt", "response"], name


def test_magic_loads_bom_and_misnamed_files_with_the_clean_rows(tmp_path, monkeypatch, capsys):
    session = Session()
    ip = ipython_shell(monkeypatch, session)
    (tmp_path / "array.jsonl").write_text(_texts()["json"], encoding="utf-8")
    (tmp_path / "lines.json").write_text(_texts()["jsonl"], encoding="utf-8")
    sources = [f"bom.{kind}" for kind in ("csv", "tsv", "json", "jsonl", "yaml")] + ["array.jsonl", "lines.json"]
    for kind, text in _texts().items():
        (tmp_path / f"bom.{kind}").write_bytes(BOM + text.encode("utf-8"))
    for number, source in enumerate(sources):
        ip.run_line_magic("lora_dataset", f"d{number} --from {source} --show 0")
        pd.testing.assert_frame_equal(session.dataset(f"d{number}").frame, CLEAN, obj=source)
    for kind, text in _texts().items():
        ip.run_cell_magic("lora_dataset", f"cell_{kind} --show 0", "\ufeff" + text)
        pd.testing.assert_frame_equal(session.dataset(f"cell_{kind}").frame, CLEAN, obj=kind)
    assert session.dataset("cell_csv").pairs()[0] == session.dataset("d0").pairs()[0]
