"""Loading a user's data set: every format from real files, and errors that say what to fix."""

import json
import os

import pytest

from rlkit.api.errors import RlkitError
from rlkit.rl.envs.records import DataError, Record, field, load_records


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_jsonl_skips_blank_lines_and_names_lines(tmp_path):
    path = write(tmp_path / "data.jsonl", '{"q": "1+1", "a": 2}\n\n  \n{"q": "2+2", "a": 4}\n')
    records = load_records(path)
    assert records == [
        Record(f"{path} line 1", {"q": "1+1", "a": 2}),
        Record(f"{path} line 4", {"q": "2+2", "a": 4}),
    ]


def test_jsonl_malformed_line_names_its_number(tmp_path):
    path = write(tmp_path / "data.jsonl", '{"q": 1}\n{"q": 2,}\n')
    with pytest.raises(DataError, match=r"data\.jsonl line 2: not valid JSON: .*column") as e:
        load_records(path)
    assert isinstance(e.value, RlkitError) and isinstance(e.value, ValueError)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "data.jsonl", '{"q": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2: expected a JSON object, got an array"):
        load_records(path)


@pytest.mark.parametrize("wrap", [lambda rows: rows, lambda rows: {"data": rows}])
def test_json_list_and_wrapped_list(tmp_path, wrap):
    path = write(tmp_path / "data.json", json.dumps(wrap([{"q": "a"}, {"q": "b"}])))
    records = load_records(path)
    assert [r.where for r in records] == [f"{path} item 0", f"{path} item 1"]
    assert [r.fields["q"] for r in records] == ["a", "b"]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"a": [1], "b": [2]}, "expected a list of objects"),
        ("text", "expected a list of objects"),
        ([{"q": 1}, 3], r"item 1: expected a JSON object, got a number"),
    ],
)
def test_json_of_the_wrong_shape(tmp_path, data, message):
    path = write(tmp_path / "data.json", json.dumps(data))
    with pytest.raises(DataError, match=message):
        load_records(path)


def test_csv_where_is_the_line_in_the_file(tmp_path):
    # The BOM is what Excel writes; it must not end up in the first column's name.
    path = write(tmp_path / "data.csv", "\ufeffquestion,answer\n1+1,2\n\n2+2,4\n")
    records = load_records(path)
    assert records == [
        Record(f"{path} line 2", {"question": "1+1", "answer": "2"}),
        Record(f"{path} line 4", {"question": "2+2", "answer": "4"}),
    ]


def test_csv_row_with_too_many_values(tmp_path):
    path = write(tmp_path / "data.csv", "q,a\n1,2\n3,4,5\n")
    with pytest.raises(DataError, match=r"line 3: more values than the header has columns"):
        load_records(path)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = str(tmp_path / "data.parquet")
    pq.write_table(pa.Table.from_pylist([{"q": "a", "a": 1}, {"q": "b", "a": 2}]), path)
    records = load_records(path)
    assert records[1] == Record(f"{path} row 1", {"q": "b", "a": 2})


def test_damaged_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    path = write(tmp_path / "data.parquet", "not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_records(path)


@pytest.mark.parametrize("name, text", [("a.jsonl", "\n\n"), ("a.json", "[]"), ("a.csv", "q,a\n")])
def test_empty_data_set(tmp_path, name, text):
    path = write(tmp_path / name, text)
    with pytest.raises(DataError, match=rf"^env\.path={path}: the data set is empty$"):
        load_records(path)


@pytest.mark.parametrize("path", ["./nope.jsonl", "/no/such/dir", "~/no-such-rlkit-data", "x.csv"])
def test_missing_file(path):
    with pytest.raises(DataError, match=rf"^data\.train={path}: no such file$"):
        load_records(path, key="data.train")


def test_unknown_suffix_lists_supported_ones(tmp_path):
    path = write(tmp_path / "data.txt", "hello\n")
    with pytest.raises(DataError, match=r"unknown file type; supported: \.jsonl, \.json, \.csv"):
        load_records(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    path = write(tmp_path / "data.jsonl", '{"q": 1}\n')
    os.chmod(path, 0)
    with pytest.raises(DataError, match=rf"env\.path={path}: cannot read: Permission denied"):
        load_records(path)


def test_undecodable_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"q": "\xff"}\n')
    with pytest.raises(DataError, match=rf"env\.path={path}: cannot read: not UTF-8 text"):
        load_records(str(path))


def test_directory_with_a_data_suffix(tmp_path):
    (tmp_path / "x.jsonl").mkdir()
    with pytest.raises(DataError, match=r"x\.jsonl: cannot read: Is a directory"):
        load_records(str(tmp_path / "x.jsonl"))


def test_missing_field_names_field_line_and_fields(tmp_path):
    path = write(tmp_path / "data.jsonl", '{"q": "1+1", "a": 2, "note": null}\n')
    (record,) = load_records(path)
    assert field(record, "a", "env.answer_field") == "2"
    with pytest.raises(DataError) as e:
        field(record, "answer", "env.answer_field")
    assert str(e.value) == (
        f"{path} line 1: no field 'answer' (env.answer_field=answer); fields: q, a, note"
    )
    # A null value is there but empty: saying "no field 'note'" while listing it misled.
    with pytest.raises(DataError) as e:
        field(record, "note", "env.answer_field")
    assert str(e.value) == f"{path} line 1: field 'note' is null (env.answer_field=note)"


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """`datasets` with no network and a private cache; it reads both settings at import."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return datasets


def test_hub_id_that_cannot_load(offline_datasets):
    name = "no-such-user/no-such-dataset-xyz"
    with pytest.raises(DataError, match=rf"^env\.path={name} \(split 'test'\): datasets cannot"):
        load_records(name, split="test")


def test_local_folder_loads_through_datasets(tmp_path, offline_datasets):
    folder = tmp_path / "problems"
    folder.mkdir()
    write(folder / "train.jsonl", '{"q": "a"}\n{"q": "b"}\n')
    records = load_records(str(folder))
    assert records[1] == Record(f"{folder}[train] row 1", {"q": "b"})
