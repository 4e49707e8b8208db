"""Load a user's data set of problems as a list of records, with errors a user can act on.

A data set is a local file (.jsonl, .json, .csv, .parquet) or anything `datasets.load_dataset`
takes (a hub id, a local folder of data files). Each record keeps where it came from, so an error
about one can name the file and line: lines are 1-based as editors show them (a CSV's header is
line 1); JSON items and Parquet and hub rows are 0-based, as indexing them in Python would be.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from rlkit.api.errors import RlkitError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_JSON_KINDS = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}
# utf-8-sig: files saved by Excel and Notepad start with a BOM, which would otherwise end up in
# the first CSV column's name or make json reject the file.
_TEXT = {"encoding": "utf-8-sig", "newline": ""}


class DataError(RlkitError, ValueError):
    """A data set that cannot be loaded, or a record that lacks a field the config names."""


@dataclass(frozen=True)
class Record:
    # Where the record came from, for messages: "data.jsonl line 12", "gsm8k[train] row 7".
    where: str
    fields: dict


def load_records(
    path: str, split: str = "train", key: str = "env.path", subset: str | None = None
) -> list[Record]:
    """The records of the data set at `path`; `key` is the config key that named it. `split`
    and `subset` (a hub data set's configuration, e.g. GSM8K's "main") apply to hub ids."""
    file = Path(path).expanduser()
    # A directory with a data suffix goes to its reader too, not to `datasets`: pyarrow reads a
    # folder of Parquet parts, and the text readers report "Is a directory".
    if file.is_file() or (file.exists() and file.suffix in SUFFIXES):
        records = _read_file(file, path, key)
    elif not file.exists() and (path.startswith((".", "/", "~")) or file.suffix in SUFFIXES):
        raise DataError(f"{key}={path}: no such file")
    else:  # a hub id, or a local folder of data files
        records = _load_hub(path, split, key, subset)
    if not records:
        raise DataError(f"{key}={path}: the data set is empty")
    return records


def field(record: Record, name: str, key: str) -> str:
    """The value of field `name` as text; `key` is the config key that named the field."""
    value = record.fields.get(name)
    if value is None and name in record.fields:
        raise DataError(f"{record.where}: field {name!r} is null ({key}={name})")
    if value is None:
        have = ", ".join(str(k) for k in record.fields) or "(none)"
        raise DataError(f"{record.where}: no field {name!r} ({key}={name}); fields: {have}")
    return str(value)


def _read_file(file: Path, path: str, key: str) -> list[Record]:
    readers = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}
    if file.suffix not in readers:
        raise DataError(f"{key}={path}: unknown file type; supported: {', '.join(SUFFIXES)}")
    try:
        return readers[file.suffix](file, path)
    except UnicodeDecodeError as e:
        raise DataError(f"{key}={path}: cannot read: not UTF-8 text ({e})") from None
    except OSError as e:
        raise DataError(f"{key}={path}: cannot read: {e.strerror or e}") from None


def _object(value, where: str) -> Record:
    if not isinstance(value, dict):
        kind = _JSON_KINDS.get(type(value), "a number")
        raise DataError(f"{where}: expected a JSON object, got {kind}")
    return Record(where, value)


def _jsonl(file: Path, path: str) -> list[Record]:
    records = []
    with file.open(**_TEXT) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                msg = f"{path} line {n}: not valid JSON: {e.msg} (column {e.colno})"
                raise DataError(msg) from None
            records.append(_object(value, f"{path} line {n}"))
    return records


def _json(file: Path, path: str) -> list[Record]:
    with file.open(**_TEXT) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON: {e}") from None
    # Also accept the common wrapper {"data": [...]}: an object holding a single list.
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a list of objects, or {{"data": [...]}}')
    return [_object(value, f"{path} item {i}") for i, value in enumerate(data)]


def _csv(file: Path, path: str) -> list[Record]:
    records = []
    with file.open(**_TEXT) as f:
        reader = csv.DictReader(f)
        for row in reader:
            # line_num counts the lines read so far, blank ones included: this row's last line.
            where = f"{path} line {reader.line_num}"
            if None in row:  # DictReader files surplus values under the key None
                raise DataError(f"{where}: more values than the header has columns")
            records.append(Record(where, row))
    return records


def _parquet(file: Path, path: str) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: Parquet needs `pip install pyarrow` (or rlkit[data])") from None
    try:
        rows = pq.read_table(file).to_pylist()
    except ValueError as e:  # pyarrow's ArrowInvalid: not a Parquet file, or a damaged one
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    return [Record(f"{path} row {i}", row) for i, row in enumerate(rows)]


def _load_hub(path: str, split: str, key: str, subset: str | None) -> list[Record]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{key}={path}: loading it needs `pip install datasets`") from None
    try:
        data = datasets.load_dataset(path, subset, split=split)
    except Exception as e:  # datasets raises many kinds; to the user each means "cannot load"
        raise DataError(f"{key}={path} (split {split!r}): datasets cannot load it: {e}") from e
    return [Record(f"{path}[{split}] row {i}", dict(row)) for i, row in enumerate(data)]
