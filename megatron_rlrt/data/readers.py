"""Rows from jsonl / json / parquet files, each with its 1-based row number.

Structural problems are errors (:class:`DatasetError` naming file and row): the file is not
what it claims to be, and dropping rows silently would hide that.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any, Iterator

from megatron_rlrt.data.errors import DatasetError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
JSON_SUFFIXES = (".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
SUPPORTED = JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES


def file_format(path: str) -> str:
    """"jsonl", "json" or "parquet" from the file name; DatasetError for anything else."""
    lower = str(path).lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(JSON_SUFFIXES):
        return "json"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise DatasetError(path, None, f"unknown dataset format; expected a file ending in {', '.join(SUPPORTED)}")


def _open(path: str):
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def _decode(path: str, row: int | None, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 4]
        unit = "line" if row is not None else "file"
        raise DatasetError(
            path, row, f"not valid UTF-8 (byte {e.start} of the {unit}: {bad!r}); expected UTF-8 encoded JSON"
        ) from None


def _as_object(path: str, row: int, value: Any) -> dict:
    if not isinstance(value, dict):
        raise DatasetError(path, row, f"expected a JSON object per row, got {type(value).__name__}")
    return value


def iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line."""
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            text = _decode(path, lineno, raw)
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise DatasetError(path, lineno, f"invalid JSON ({e.msg} at column {e.colno}); expected one JSON object per line") from None
            yield lineno, _as_object(path, lineno, value)


def iter_json(path: str) -> Iterator[tuple[int, dict]]:
    """A JSON array of objects (row = array position), or JSON lines in a .json file."""
    with _open(path) as f:
        head = f.read(1 << 16).lstrip()
    if not head.startswith(b"["):
        yield from iter_jsonl(path)
        return
    with _open(path) as f:
        raw = f.read()
    text = _decode(path, None, raw)
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(path, None, f"invalid JSON ({e.msg} at line {e.lineno}); expected an array of objects") from None
    for i, value in enumerate(values, 1):
        yield i, _as_object(path, i, value)


def iter_parquet(path: str, batch_rows: int = 4096) -> Iterator[tuple[int, dict]]:
    """(row number, row dict) per parquet row, read in record batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(path, None, f"cannot read as parquet ({e})") from None
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            for value in batch.to_pylist():
                row += 1
                yield row, value
    except (pa.ArrowException, UnicodeDecodeError) as e:
        raise DatasetError(path, row + 1, f"cannot decode parquet data near this row ({e})") from None


def parquet_columns(path: str) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.ParquetFile(path).schema_arrow.names)


def iter_rows(path: str) -> Iterator[tuple[int, dict]]:
    """(row number, row) for any supported file; FileNotFoundError if it does not exist."""
    path = os.fspath(path)
    fmt = file_format(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset file not found: {path}")
    if os.path.isdir(path):
        raise DatasetError(path, None, "is a directory; expected a dataset file")
    if fmt == "jsonl":
        return iter_jsonl(path)
    if fmt == "json":
        return iter_json(path)
    return iter_parquet(path)
