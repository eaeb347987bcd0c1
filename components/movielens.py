"""MovieLens ratings -> tf.Examples of `feature_specs.movielens.MOVIELENS`, split by user.

Reads any official GroupLens release zip directly -- ML-100K (u.data, u.item), ML-1M and
ML-10M ("::"-separated .dat files), ML-20M, ML-25M, ML-32M and ml-latest(-small) (CSV),
the layout told from the zip's members -- and writes one example per rating, following
the POSO paper's public-data protocol (its Table 5):

* For a rating of user u at time t, everything the example knows about u comes from
  strictly earlier times (< t; ratings in the same second are simultaneous, not history):

      avc            = #{ratings of u with timestamp < t}
      hist_movie_ids = the movies of those ratings, most recent first, at most 30
      hist_tags      = the tags u applied at timestamps < t, most recent first, at most 30

  Ties within one earlier second are ordered by descending movie id (then tag id), so
  the lists are deterministic. A tag's id is the CRC-32 of its stripped, lower-cased text.
* Genres: feature_specs.movielens.genre_id of each (older names through GENRE_ALIASES, any
  unknown name GENRE_OOV_ID). ML-100K and ML-1M have no tags: their tag lists are empty.
* favorite = [rating >= 5], satisfied = [rating >= 4].
* Users are split by a seeded 64-bit hash of their id: a user is a test user iff
  hash(user, seed) / 2^64 < test_fraction. Test users never occur in training.

Everything is vectorized with NumPy over rows sorted by (user, timestamp, movie) and
encoded with tfx_bsl's Arrow-to-tf.Example coder in shards, so ML-20M (20M ratings)
takes minutes and a few GB, not hours.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import zipfile
import zlib
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from feature_specs import movielens as ml
from feature_specs.specs import Dtype, Kind

__all__ = ["MovieLensTables", "read_movielens", "detect_layout", "LAYOUTS", "CSV", "DAT", "ML100K",
           "PreparedRatings", "prepare_ratings", "test_user_mask", "example_columns", "examples_frame", "write_examples", "SPLITS", "TRAIN", "TEST"]

TRAIN, TEST = "train", "test"
SPLITS = (TRAIN, TEST)
_SUMMARY_FILE = "summary.json"
_VALIDATION_SEED_OFFSET = 1_000_003  # validation users: an independent hash of the training users
_TIME_BITS = 32  # sort key = user << 32 | timestamp; Unix seconds fit in 32 bits until 2106


# The releases' file layouts, told apart by their ratings member.
CSV, DAT, ML100K = "csv", "dat", "ml-100k"
LAYOUTS = {
    CSV: (ml.RATINGS_MEMBER, "ML-20M, ML-25M, ML-32M, ml-latest, ml-latest-small: ratings.csv, movies.csv, tags.csv"),
    DAT: (ml.DAT_RATINGS_MEMBER, "ML-1M, ML-10M: ratings.dat, movies.dat (and tags.dat), '::'-separated"),
    ML100K: (ml.ML100K_RATINGS_MEMBER, "ML-100K: u.data, u.item"),
}
_RATING_TYPES = {"userId": "Int64", "movieId": "Int64", "rating": "float64", "timestamp": "Int64"}
_TAG_TYPES = {"userId": "Int64", "movieId": "Int64", "tag": str, "timestamp": "Int64"}
_MOVIE_TYPES = {"movieId": "Int64", "title": str, "genres": str}
_UNIT_SEPARATOR = "\x1f"  # stands in for "::" so pandas' C parser reads the .dat files


@dataclasses.dataclass(frozen=True)
class MovieLensTables:
    ratings: pd.DataFrame  # userId, movieId, rating, timestamp
    tags: pd.DataFrame     # userId, movieId, tag, timestamp
    movies: pd.DataFrame   # movieId, title, genres ("|"-joined names)
    layout: str = CSV      # which release's file layout the zip had (LAYOUTS)


def _top_members(archive: zipfile.ZipFile) -> List[str]:
    """Members in the root or one top-level folder (ml-20m/...), where GroupLens puts the files."""
    return [m for m in archive.namelist() if m.count("/") <= 1 and not m.endswith("/")]


def _member(archive: zipfile.ZipFile, zip_path: str, name: str, required: bool = True) -> Optional[str]:
    """The archive member called `name` (None if absent and not required)."""
    matches = [m for m in _top_members(archive) if m.split("/")[-1] == name]
    if len(matches) == 1 or (not matches and not required):
        return matches[0] if matches else None
    found = "none" if not matches else f"several: {matches}"
    raise FileNotFoundError(f"{zip_path}: expected exactly one member {name!r} (a MovieLens zip such as "
                            f"ml-latest-small.zip or ml-20m.zip), found {found}")


def detect_layout(archive: zipfile.ZipFile, zip_path: str) -> str:
    """The key of LAYOUTS whose ratings member the zip has; ValueError for none or several."""
    names = {m.split("/")[-1] for m in _top_members(archive)}
    found = [layout for layout, (ratings, _) in LAYOUTS.items() if ratings in names]
    if len(found) == 1:
        return found[0]
    members = sorted(_top_members(archive))
    shown = ", ".join(members[:8]) + (f" and {len(members) - 8} more" if len(members) > 8 else "")
    problem = "has the files of several layouts" if found else "is not a MovieLens release"
    raise ValueError(f"{zip_path}: {problem}; expected one of: "
                     + "; ".join(description for _, description in LAYOUTS.values())
                     + f" (in the root or one top-level folder); it has: {shown or 'no files'}")


def _typed(frame: pd.DataFrame, dtypes: Mapping[str, object], where: str) -> pd.DataFrame:
    """Checks that no typed column has a missing value; attrs["where"] = where for later messages."""
    for column, dtype in dtypes.items():
        if dtype is not str and frame[column].isna().any():
            row = int(np.flatnonzero(frame[column].isna().to_numpy())[0])
            raise ValueError(f"{where}: missing {column!r} in data row {row + 1}")
    frame.attrs["where"] = where
    return frame


def _parse(source, where: str, dtypes: Mapping[str, object], **read_csv) -> pd.DataFrame:
    try:
        return pd.read_csv(source, dtype=dtypes, keep_default_na=False,
                           na_values={c: [""] for c, t in dtypes.items() if t is not str}, **read_csv)
    except (ValueError, pd.errors.ParserError) as error:
        raise ValueError(f"{where}: cannot parse: {error}") from None


def _read_csv(archive: zipfile.ZipFile, zip_path: str, name: str, columns: Sequence[str],
              dtypes: Mapping[str, object]) -> pd.DataFrame:
    """A CSV member with a header row; its attrs["where"] is "<zip>:<member>" for error messages."""
    member = _member(archive, zip_path, name)
    where = f"{zip_path}:{member}"
    with archive.open(member) as f:
        header = f.readline().decode("utf-8").strip().split(",")
    if tuple(header) != tuple(columns):
        raise ValueError(f"{where}: expected columns {list(columns)}, got {header}")
    with archive.open(member) as f:
        return _typed(_parse(f, where, dtypes), dtypes, where)


def _read_separated(archive: zipfile.ZipFile, zip_path: str, name: str, columns: Sequence[str],
                    dtypes: Mapping[str, object], separator: str, required: bool = True) -> Optional[pd.DataFrame]:
    """A header-less member whose fields are split by `separator` (None if absent and not required).

    Text is UTF-8 if the member decodes as such, else Latin-1 (ML-1M, ML-100K).
    """
    member = _member(archive, zip_path, name, required)
    if member is None:
        return None
    where = f"{zip_path}:{member}"
    with archive.open(member) as f:
        data = f.read()
    if len(separator) > 1:  # pandas' C parser takes one character
        data = data.replace(separator.encode(), _UNIT_SEPARATOR.encode())
        separator = _UNIT_SEPARATOR
    encoding = "utf-8"
    try:
        if str in dtypes.values():  # numbers read the same either way
            data.decode(encoding)
    except UnicodeDecodeError:
        encoding = "latin-1"
    frame = _parse(io.BytesIO(data), where, {columns.index(c): t for c, t in dtypes.items()}, header=None,
                   sep=separator, quoting=csv.QUOTE_NONE, encoding=encoding)
    if frame.shape[1] != len(columns):
        raise ValueError(f"{where}: expected {len(columns)} fields per line ({', '.join(columns)}), "
                         f"got {frame.shape[1]}")
    frame.columns = list(columns)
    return _typed(frame, dtypes, where)


def _read_tables(archive: zipfile.ZipFile, zip_path: str, layout: str):
    """(ratings, tags or None, movies) with the columns of the CSV layout."""
    if layout == CSV:
        return (_read_csv(archive, zip_path, ml.RATINGS_MEMBER, ml.RATINGS_COLUMNS, _RATING_TYPES),
                _read_csv(archive, zip_path, ml.TAGS_MEMBER, ml.TAGS_COLUMNS, _TAG_TYPES),
                _read_csv(archive, zip_path, ml.MOVIES_MEMBER, ml.MOVIES_COLUMNS, _MOVIE_TYPES))
    if layout == DAT:
        return (_read_separated(archive, zip_path, ml.DAT_RATINGS_MEMBER, ml.RATINGS_COLUMNS, _RATING_TYPES,
                                ml.DAT_SEPARATOR),
                _read_separated(archive, zip_path, ml.DAT_TAGS_MEMBER, ml.TAGS_COLUMNS, _TAG_TYPES,
                                ml.DAT_SEPARATOR, required=False),
                _read_separated(archive, zip_path, ml.DAT_MOVIES_MEMBER, ml.MOVIES_COLUMNS, _MOVIE_TYPES,
                                ml.DAT_SEPARATOR))
    ratings = _read_separated(archive, zip_path, ml.ML100K_RATINGS_MEMBER, ml.RATINGS_COLUMNS, _RATING_TYPES, "\t")
    flag_types = {flag: "Int64" for flag in ml.ML100K_GENRE_FLAGS}
    items = _read_separated(archive, zip_path, ml.ML100K_MOVIES_MEMBER, ml.ML100K_MOVIE_FIELDS,
                            {"movieId": "Int64", "title": str, **flag_types}, "|")
    flags = items[list(ml.ML100K_GENRE_FLAGS)].to_numpy(np.int64)
    bad = (flags != 0) & (flags != 1)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise ValueError(f"{items.attrs['where']}: genre flag {ml.ML100K_GENRE_FLAGS[column]!r} is "
                         f"{flags[row, column]} in data row {row + 1}, expected 0 or 1")
    genres = ["|".join(g for g, flag in zip(ml.ML100K_GENRE_FLAGS, row) if flag) or "unknown" for row in flags]
    movies = pd.DataFrame({"movieId": items["movieId"], "title": items["title"], "genres": genres})
    movies.attrs["where"] = items.attrs["where"]
    return ratings, None, movies


def read_movielens(zip_path: str) -> MovieLensTables:
    """Reads the ratings, tags (where the release has them) and movies of a GroupLens MovieLens zip.

    The layout (LAYOUTS: ML-100K, ML-1M/10M, ML-20M and later) is told from the zip's members.
    Raises FileNotFoundError for a missing zip or member and ValueError naming the file
    (and row) for a zip of no known layout, wrong columns or values.
    """
    if not os.path.isfile(zip_path):
        raise FileNotFoundError(f"MovieLens zip {zip_path!r} does not exist")
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as error:
        raise ValueError(f"{zip_path}: not a zip file ({error})") from None
    with archive:
        layout = detect_layout(archive, zip_path)
        ratings, tags, movies = _read_tables(archive, zip_path, layout)
    if tags is None:
        tags = pd.DataFrame({c: pd.Series(dtype=object if t is str else "Int64") for c, t in _TAG_TYPES.items()})
        tags.attrs["where"] = f"{zip_path} (no tags)"
    bad = ~ratings["rating"].between(0.5, 5.0)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"{ratings.attrs['where']}: rating {ratings['rating'].iat[row]} in data row {row + 1} "
                         "is outside 0.5..5")
    for frame in (ratings, tags):
        bad = ((frame["timestamp"] < 0) | (frame["timestamp"] >= 1 << _TIME_BITS)
               | (frame["userId"] < 0) | (frame["userId"] >= 1 << (63 - _TIME_BITS)))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"{frame.attrs['where']}: userId/timestamp out of range in data row {row + 1}: "
                             f"{frame.iloc[row].to_dict()}")
    ratings = ratings.astype({"userId": np.int64, "movieId": np.int64, "timestamp": np.int64})
    tags = tags[tags["tag"].str.strip() != ""]  # an empty tag is no tag
    tags = tags.astype({"userId": np.int64, "movieId": np.int64, "timestamp": np.int64})
    movies = movies.astype({"movieId": np.int64})
    return MovieLensTables(ratings, tags, movies, layout)


def tag_id(tag: str) -> int:
    """A tag's id: CRC-32 of its stripped, lower-cased UTF-8 text (stable across runs)."""
    return zlib.crc32(tag.strip().lower().encode("utf-8"))


def _genre_ids(movies: pd.DataFrame) -> Dict[int, List[int]]:
    """movie id -> its distinct genre ids (feature_specs.movielens.genre_id), in the file's order."""
    ids = {name: ml.genre_id(name) for name in set("|".join(movies["genres"].to_numpy()).split("|"))}
    return {int(movie_id): list(dict.fromkeys(ids[g] for g in text.split("|")))
            for movie_id, text in zip(movies["movieId"].to_numpy(), movies["genres"].to_numpy())}


def test_user_mask(user_ids: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """True for test users: splitmix64(user + seed * golden) / 2^64 < test_fraction."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    with np.errstate(over="ignore"):
        x = np.asarray(user_ids, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < test_fraction


@dataclasses.dataclass(frozen=True)
class PreparedRatings:
    """Ratings sorted by (user, timestamp, movie) with what every row's lists need.

    earlier_end[i]: the first row of row i's (user, timestamp): rows user_start[i] ..
      earlier_end[i] - 1 are the user's strictly earlier ratings (so avc = their count).
    tag_start[i], tag_end[i]: the same for the sorted tag applications.
    """

    user_id: np.ndarray
    movie_id: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    user_start: np.ndarray
    earlier_end: np.ndarray
    tag_ids: np.ndarray
    tag_start: np.ndarray
    tag_end: np.ndarray
    genre_offsets: np.ndarray  # row i's genres: genre_values[genre_offsets[i]:genre_offsets[i + 1]]
    genre_values: np.ndarray

    @property
    def avc(self) -> np.ndarray:
        return self.earlier_end - self.user_start

    def __len__(self) -> int:
        return self.user_id.size


def prepare_ratings(tables: MovieLensTables) -> PreparedRatings:
    ratings = tables.ratings.sort_values(["userId", "timestamp", "movieId"], kind="stable")
    user = ratings["userId"].to_numpy(np.int64)
    movie = ratings["movieId"].to_numpy(np.int64)
    time = ratings["timestamp"].to_numpy(np.int64)
    key = (user << _TIME_BITS) | time
    user_start = np.searchsorted(key, user << _TIME_BITS, side="left")
    earlier_end = np.searchsorted(key, key, side="left")

    tags = tables.tags.assign(tag_id=[tag_id(t) for t in tables.tags["tag"].to_numpy()])
    tags = tags.sort_values(["userId", "timestamp", "movieId", "tag_id"], kind="stable")
    tag_key = (tags["userId"].to_numpy(np.int64) << _TIME_BITS) | tags["timestamp"].to_numpy(np.int64)
    tag_start = np.searchsorted(tag_key, user << _TIME_BITS, side="left")
    tag_end = np.searchsorted(tag_key, key, side="left")

    genres = _genre_ids(tables.movies)
    # Per distinct movie once, then gathered per row.
    movies, movie_index = np.unique(movie, return_inverse=True)
    movie_lengths = np.array([len(genres.get(int(m), ())) for m in movies], dtype=np.int64)
    movie_values = np.array([g for m in movies for g in genres.get(int(m), ())], dtype=np.int64)
    movie_offsets = np.concatenate([[0], np.cumsum(movie_lengths)])
    lengths = movie_lengths[movie_index]
    genre_offsets = np.concatenate([[0], np.cumsum(lengths)])
    genre_values = movie_values[_ranges(movie_offsets[movie_index], lengths)]
    return PreparedRatings(user, movie, ratings["rating"].to_numpy(np.float64), time, user_start, earlier_end,
                           tags["tag_id"].to_numpy(np.int64), tag_start, tag_end, genre_offsets, genre_values)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for every (s, n)."""
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def _recent_first(ends: np.ndarray, starts: np.ndarray, limit: int):
    """For every row: indices ends-1, ends-2, ... down to max(starts, ends - limit); as (offsets, flat)."""
    lengths = np.minimum(ends - starts, limit)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    steps = np.arange(int(offsets[-1]), dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    return offsets, np.repeat(ends - 1, lengths) - steps


def example_columns(prepared: PreparedRatings, rows: np.ndarray,
                    history_length: int = ml.MOVIELENS.feature(ml.HIST_MOVIE_IDS).max_length
                    ) -> Dict[str, tuple]:
    """The MOVIELENS features of `rows` (indices into `prepared`): name -> (offsets, values)."""
    scalar_offsets = np.arange(rows.size + 1, dtype=np.int64)
    hist_offsets, hist_rows = _recent_first(prepared.earlier_end[rows], prepared.user_start[rows], history_length)
    tag_offsets, tag_rows = _recent_first(prepared.tag_end[rows], prepared.tag_start[rows], history_length)
    genre_lengths = np.diff(prepared.genre_offsets)[rows]
    rating = prepared.rating[rows]
    return {
        ml.USER_ID: (scalar_offsets, prepared.user_id[rows]),
        ml.MOVIE_ID: (scalar_offsets, prepared.movie_id[rows]),
        ml.MOVIE_GENRES: (np.concatenate([[0], np.cumsum(genre_lengths)]),
                          prepared.genre_values[_ranges(prepared.genre_offsets[rows], genre_lengths)]),
        ml.HIST_MOVIE_IDS: (hist_offsets, prepared.movie_id[hist_rows]),
        ml.HIST_TAGS: (tag_offsets, prepared.tag_ids[tag_rows]),
        ml.AVC: (scalar_offsets, prepared.avc[rows]),
        ml.FAVORITE: (scalar_offsets, (rating >= ml.FAVORITE_MIN_RATING).astype(np.int64)),
        ml.SATISFIED: (scalar_offsets, (rating >= ml.SATISFIED_MIN_RATING).astype(np.int64)),
    }


def examples_frame(prepared: PreparedRatings, rows: Optional[np.ndarray] = None) -> pd.DataFrame:
    """The examples of `rows` (default: all) as a DataFrame with list columns (small data only)."""
    rows = np.arange(len(prepared)) if rows is None else rows
    columns = example_columns(prepared, rows)
    frame = {}
    for feature in ml.MOVIELENS.features:
        offsets, values = columns[feature.name]
        if feature.kind is Kind.SEQUENCE:
            frame[feature.name] = [values[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
        else:
            frame[feature.name] = values
    frame["timestamp"] = prepared.timestamp[rows]
    frame["rating"] = prepared.rating[rows]
    return pd.DataFrame(frame)


def _encode(columns: Mapping[str, tuple]) -> List[bytes]:
    import pyarrow as pa
    from tfx_bsl.coders import example_coder

    arrow_types = {Dtype.INT64: pa.int64(), Dtype.FLOAT32: pa.float32()}
    arrays = {}
    for feature in ml.MOVIELENS.features:
        offsets, values = columns[feature.name]
        arrays[feature.name] = pa.LargeListArray.from_arrays(
            pa.array(offsets, pa.int64()), pa.array(values, arrow_types[feature.dtype]))
    return example_coder.RecordBatchToExamples(pa.RecordBatch.from_pydict(arrays))


def _shards(rows: np.ndarray, rows_per_shard: int) -> Iterator[np.ndarray]:
    for start in range(0, max(rows.size, 1), rows_per_shard):
        yield rows[start:start + rows_per_shard]


def write_examples(zip_path: str, output_dir: str, *, test_fraction: float = 0.2, seed: int = 0,
                   validation: bool = False, rows_per_shard: int = 500_000) -> Dict[str, object]:
    """Writes gzip TFRecord tf.Examples to <output_dir>/{train,test}/part-NNNNN.tfrecord.gz.

    validation: for choosing hyper-parameters without touching the test users: the test
      users are left out entirely, and "test" holds validation users, a `test_fraction`
      of the training users drawn with another hash seed.

    Training rows are written in a seeded random order (readers shuffle with a bounded
    buffer; rows sorted by user would reach the model in user blocks); test rows stay
    sorted by (user, timestamp, movie). Returns (and writes to summary.json) the counts.
    """
    import tensorflow as tf

    tables = read_movielens(zip_path)
    prepared = prepare_ratings(tables)
    is_test = test_user_mask(prepared.user_id, test_fraction, seed)
    if validation:
        is_validation = ~is_test & test_user_mask(prepared.user_id, test_fraction, seed + _VALIDATION_SEED_OFFSET)
        prepared_rows = ~is_test
        is_test = is_validation
    else:
        prepared_rows = np.ones(len(prepared), dtype=bool)
    split_rows = {TRAIN: np.random.default_rng(seed).permutation(np.flatnonzero(prepared_rows & ~is_test)),
                  TEST: np.flatnonzero(is_test)}
    summary = {"zip": os.path.abspath(zip_path), "test_fraction": test_fraction, "seed": seed,
               "validation": validation}
    for split, rows in split_rows.items():
        split_dir = os.path.join(output_dir, split)
        tf.io.gfile.makedirs(split_dir)
        for shard, shard_rows in enumerate(_shards(rows, rows_per_shard)):
            path = os.path.join(split_dir, f"part-{shard:05d}.tfrecord.gz")
            with tf.io.TFRecordWriter(path, options="GZIP") as writer:
                for record in _encode(example_columns(prepared, shard_rows)):
                    writer.write(record)
        ratings = prepared.rating[rows]
        summary[split] = {"examples": int(rows.size), "users": int(np.unique(prepared.user_id[rows]).size),
                          "favorite_rate": float(np.mean(ratings >= ml.FAVORITE_MIN_RATING)) if rows.size else 0.0,
                          "satisfied_rate": float(np.mean(ratings >= ml.SATISFIED_MIN_RATING)) if rows.size else 0.0}
    with open(os.path.join(output_dir, _SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return summary
