"""Reading data: inline text, files, objects; and the one-line messages for bad input."""

import pandas as pd
import pytest

from ipylora.engine import DatasetError
from ipylora.engine.sources import read_object, read_path, read_text


def test_inline_formats():
    assert read_text("a,b\n1,2\n3,4\n").shape == (2, 2)
    assert list(read_text('[{"a": 1, "b": "x"}]').columns) == ["a", "b"]
    assert len(read_text('{"a": 1}\n{"a": 2}\n')) == 2
    assert read_text("a\tb\n1\t2", "tsv").shape == (1, 2)


def test_malformed_csv_names_the_line():
    with pytest.raises(DatasetError) as err:
        read_text("concept,description\nA,fine\nB,not, quoted\nC,ok\n")
    message = str(err.value)
    assert "line 3" in message and "3 fields" in message and "quotes" in message
    assert "\n" not in message


def test_invalid_json_names_line_and_column():
    with pytest.raises(DatasetError, match=r"line 2, column"):
        read_text('[{"a": 1},\n {"a": }]')
    with pytest.raises(DatasetError, match=r"line 2 of the cell"):
        read_text('{"a": 1}\n{"a": oops}\n')


def test_files(tmp_path):
    frame = pd.DataFrame({"q": ["a", "b"], "a": ["x", "y"]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    frame.to_json(tmp_path / "d.json", orient="records")
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.jsonl", "d.json", "d.parquet"):
        assert read_path(str(tmp_path / name)).equals(frame), name


def test_missing_file_suggests_nearest(tmp_path):
    (tmp_path / "train.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError) as err:
        read_path(str(tmp_path / "train。csv"))  # the seed's full-width period
    assert "Did you mean" in str(err.value) and "train.csv" in str(err.value)


def test_directory_and_unknown_extension(tmp_path):
    with pytest.raises(DatasetError, match="is a folder"):
        read_path(str(tmp_path))
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(DatasetError, match="not one of"):
        read_path(str(tmp_path / "x.xlsx"))


def test_objects():
    assert read_object([{"a": 1}, {"a": 2}]).shape == (2, 1)
    with pytest.raises(DatasetError, match="Cannot use a int"):
        read_object(3)
