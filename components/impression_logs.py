"""Reading and validating one day of raw impression logs (KuaiRand log schema).

Pure Python (no Beam, no TensorFlow) so the rules are easy to test and reuse: the Beam
step in `avc_example_gen` calls `read_day_rows` and `validate_row` for every row.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import glob
import hashlib
import json
import os
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from feature_specs import specs

DAY_MS = 86_400_000
LOGS_DIR = "logs"
USER_TABLE_FILE = "user_features.csv"
VIDEO_TABLE_FILE = "video_features.csv"
LOG_FORMATS = ("csv", "parquet")


# Log columns holding a task's 0/1 label: any other value is a bad row, not a label to clip.
LABEL_COLUMNS = tuple(f.name for f in specs.features_of_kind(specs.Kind.LABEL) if f.name in specs.LOG_COLUMNS)
_HASH_CHUNK = 1 << 20


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


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(files: Sequence[str], cache_file: Optional[str] = None) -> List[Dict[str, object]]:
    """[{"name", "size", "sha256"}] of each file, in order.

    With `cache_file`, a file whose (path, size, mtime) is in the cache is not read again; the cache
    (a JSON file) is rewritten with every file described.
    """
    cache: Dict[str, List] = {}
    if cache_file and os.path.exists(cache_file):
        try:
            with open(cache_file) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}  # a damaged cache is only slower
    described, changed = [], False
    for path in files:
        stat = os.stat(path)
        key = os.path.abspath(path)
        size_and_time = [stat.st_size, stat.st_mtime_ns]
        entry = cache.get(key)
        if entry is None or entry[:2] != size_and_time:
            entry = size_and_time + [file_sha256(path)]
            cache[key], changed = entry, True
        described.append({"name": os.path.basename(path), "size": stat.st_size, "sha256": entry[2]})
    if cache_file and changed:
        os.makedirs(os.path.dirname(os.path.abspath(cache_file)), exist_ok=True)
        partial = f"{cache_file}.{os.getpid()}.tmp"
        with open(partial, "w") as f:
            json.dump(cache, f)
        os.replace(partial, cache_file)
    return described


def fingerprint(described: Iterable[Dict[str, object]]) -> str:
    """A day's input in one string: 'name:size:sha256' per log file, sorted by name.

    Only the day's log files: the feature tables are shared by every day (after changing them,
    rerun with --no-cache)."""
    return ";".join(f"{d['name']}:{d['size']}:{d['sha256']}" for d in sorted(described, key=lambda d: d["name"]))


def day_fingerprint(input_base: str, date: datetime.date, cache_file: Optional[str] = None) -> str:
    """fingerprint() of the day's log files; '' when the day has none."""
    try:
        files = day_files(input_base, date)
    except LogFormatError:
        return ""
    return fingerprint(describe_files(files, cache_file))


def duplicate_files(described: Sequence[Dict[str, object]], files: Sequence[str]) -> List[Tuple[str, str]]:
    """(copy, original) for every file with the same content as an earlier one of the day."""
    first: Dict[str, str] = {}
    copies = []
    for path, d in zip(files, described):
        if d["sha256"] in first:
            copies.append((path, first[d["sha256"]]))
        else:
            first[str(d["sha256"])] = path
    return copies


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
    for name in LABEL_COLUMNS:
        if values[name] not in (0, 1):
            return bad(f"column {name!r}: label {values[name]} is not 0 or 1")
    day_start = specs.day_start_ms(date)
    if not day_start <= values[specs.TIME_MS] < day_start + DAY_MS:
        return bad(f"column {specs.TIME_MS!r}: {values[specs.TIME_MS]} is outside {date.isoformat()} "
                   f"({specs.LOG_TIMEZONE.tzname(None)}, the logs' time zone)")
    if values[specs.DATE] != int(date.strftime("%Y%m%d")):
        return bad(f"column {specs.DATE!r}: {values[specs.DATE]} is not {date.strftime('%Y%m%d')}")
    if values[specs.VIDEO_ID] not in known_videos:
        return bad(f"column {specs.VIDEO_ID!r}: unknown video {values[specs.VIDEO_ID]}")
    return Impression(tuple(values[c] for c in specs.LOG_COLUMNS), path, row_number), None


def split_duplicates(impressions: Iterable[Impression]) -> Tuple[List[Impression], List[BadRow]]:
    """(unique impressions, a BadRow for every exact duplicate): rows equal in every column are one
    impression logged twice; the first in (file, row) order is kept."""
    first: Dict[Tuple[int, ...], Impression] = {}
    duplicates = []
    for imp in sorted(impressions, key=lambda i: (i.file, i.row_number)):
        kept = first.setdefault(imp.values, imp)
        if kept is not imp:
            duplicates.append(BadRow(imp.file, imp.row_number,
                                     f"duplicate row: same as {kept.file} row {kept.row_number}",
                                     ",".join(str(v) for v in imp.values)))
    return list(first.values()), duplicates


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
