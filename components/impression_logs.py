"""Reading and validating one day of raw impression logs (KuaiRand log schema).

Pure Python (no Beam, no TensorFlow) so the rules are easy to test and reuse: the Beam
step in `avc_example_gen` calls `read_day_rows` and `validate_row` for every row.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import glob
import os
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from feature_specs import specs

DAY_MS = 86_400_000
LOGS_DIR = "logs"
USER_TABLE_FILE = "user_features.csv"
VIDEO_TABLE_FILE = "video_features.csv"
LOG_FORMATS = ("csv", "parquet")


class LogFormatError(ValueError):
    """A day's log file cannot be used (missing, unreadable, or too many bad rows)."""


@dataclasses.dataclass(frozen=True)
class BadRow:
    file: str
    row_number: int  # 1-based data row (the header is row 0)
    reason: str
    raw: str


def day_dir(input_base: str, date: datetime.date) -> str:
    return os.path.join(input_base, LOGS_DIR, date.isoformat())


def day_files(input_base: str, date: datetime.date) -> List[str]:
    """The log files of one date: logs/YYYY-MM-DD/*.csv or *.parquet."""
    folder = day_dir(input_base, date)
    files = sorted(f for ext in LOG_FORMATS for f in glob.glob(os.path.join(folder, f"*.{ext}")))
    if not files:
        raise LogFormatError(f"no log files for {date.isoformat()}: expected {folder}/*.csv or *.parquet")
    return files


def available_dates(input_base: str) -> List[datetime.date]:
    dates = []
    for path in glob.glob(os.path.join(input_base, LOGS_DIR, "*")):
        try:
            dates.append(datetime.date.fromisoformat(os.path.basename(path)))
        except ValueError:
            continue
    return sorted(dates)


def read_raw_rows(path: str) -> Iterator[Tuple[int, List[str]]]:
    """Yields (row_number, fields) for every data row; checks the header first."""
    if path.endswith(".parquet"):
        yield from _read_parquet_rows(path)
        return
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise LogFormatError(f"{path}: empty file (no header)")
        _check_header(path, [h.strip() for h in header])
        for number, fields in enumerate(reader, start=1):
            yield number, fields


def _read_parquet_rows(path: str) -> Iterator[Tuple[int, List[str]]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    _check_header(path, list(parquet.schema_arrow.names))
    number = 0
    for batch in parquet.iter_batches(batch_size=65_536, columns=list(specs.LOG_COLUMNS)):
        columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
        for values in zip(*columns):
            number += 1
            yield number, ["" if v is None else str(v) for v in values]


def _check_header(path: str, header: Sequence[str]) -> None:
    missing = [c for c in specs.LOG_COLUMNS if c not in header]
    if missing:
        raise LogFormatError(f"{path}: missing log columns {missing}; expected {list(specs.LOG_COLUMNS)}")
    if list(header) != list(specs.LOG_COLUMNS):
        raise LogFormatError(
            f"{path}: columns {list(header)} differ from the KuaiRand log schema {list(specs.LOG_COLUMNS)}")


COLUMN_INDEX = {name: i for i, name in enumerate(specs.LOG_COLUMNS)}


class Impression(NamedTuple):
    """One valid log row: its integer fields in LOG_COLUMNS order, and where it came from.

    A tuple rather than a dict or dataclass: millions of these cross Beam's shuffle.
    """

    values: Tuple[int, ...]
    file: str
    row_number: int

    def value(self, column: str) -> int:
        return self.values[COLUMN_INDEX[column]]

    @property
    def user_id(self) -> int:
        return self.values[COLUMN_INDEX[specs.USER_ID]]

    @property
    def sort_key(self) -> Tuple[int, str, int]:
        return self.values[COLUMN_INDEX[specs.TIME_MS]], self.file, self.row_number


def validate_row(path: str, row_number: int, fields: List[str], date: datetime.date,
                 known_videos) -> Tuple[Optional[Impression], Optional[BadRow]]:
    """Checks one row against the schema and the day it belongs to."""
    raw = ",".join(fields)

    def bad(reason: str):
        return None, BadRow(path, row_number, reason, raw)

    if len(fields) != len(specs.LOG_COLUMNS):
        return bad(f"expected {len(specs.LOG_COLUMNS)} columns, got {len(fields)}")
    values = {}
    for name, text in zip(specs.LOG_COLUMNS, fields):
        try:
            values[name] = int(text)
        except ValueError:
            try:  # Parquet and pandas may render integers as "3.0".
                number = float(text)
            except ValueError:
                return bad(f"column {name!r}: {text!r} is not an integer")
            if not number.is_integer():
                return bad(f"column {name!r}: {text!r} is not an integer")
            values[name] = int(number)
    for name in (specs.USER_ID, specs.VIDEO_ID, specs.TIME_MS, specs.PLAY_TIME_MS, specs.DURATION_MS):
        if values[name] < 0:
            return bad(f"column {name!r}: negative value {values[name]}")
    day_start = specs.day_start_ms(date)
    if not day_start <= values[specs.TIME_MS] < day_start + DAY_MS:
        return bad(f"column {specs.TIME_MS!r}: {values[specs.TIME_MS]} is outside {date.isoformat()} "
                   f"({specs.LOG_TIMEZONE.tzname(None)}, the logs' time zone)")
    if values[specs.DATE] != int(date.strftime("%Y%m%d")):
        return bad(f"column {specs.DATE!r}: {values[specs.DATE]} is not {date.strftime('%Y%m%d')}")
    if values[specs.VIDEO_ID] not in known_videos:
        return bad(f"column {specs.VIDEO_ID!r}: unknown video {values[specs.VIDEO_ID]}")
    return Impression(tuple(values[c] for c in specs.LOG_COLUMNS), path, row_number), None


def read_table(path: str, key: str) -> Dict[int, Dict[str, str]]:
    """Reads a KuaiRand feature file (users or videos) into {id: row}."""
    if not os.path.exists(path):
        raise LogFormatError(f"feature table {path} is missing")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or key not in reader.fieldnames:
            raise LogFormatError(f"{path}: no {key!r} column (columns: {reader.fieldnames})")
        table = {}
        for number, row in enumerate(reader, start=1):
            try:
                table[int(row[key])] = row
            except (TypeError, ValueError):
                raise LogFormatError(f"{path}, row {number}: {key}={row.get(key)!r} is not an integer") from None
    return table
