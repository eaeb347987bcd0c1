"""Synthetic impression logs in KuaiRand's published format, with a new-user shift.

Output layout (the layout `components.impression_logs` reads)::

    OUT/logs/YYYY-MM-DD/log.csv    one file per date (or log.parquet), columns LOG_COLUMNS
    OUT/logs/YYYY-MM-DD/truth.arrow  beside it: every label's true probability per impression
                                   (TRUTH_FILE, read_truth; the product reads only *.csv/*.parquet)
    OUT/user_features.csv          columns USER_TABLE_COLUMNS (as KuaiRand's user_features_pure.csv)
    OUT/video_features.csv         columns VIDEO_TABLE_COLUMNS (as video_features_basic_pure.csv)

Every day has exactly `impressions_per_day` rows. The feature files list the users and
videos that appear in the logs.

Population
----------
Users who exist before the first date ("pre-existing": 0.15 per daily impression, at least
min(3000, rows per day / 4)) are active on a day with a probability and an intensity set by
their `user_active_degree`. Their earlier history is implicit: every one of them appears on
the first date, so a pipeline that derives first appearance from the files starts their AVC
at 0 and flags them as new on day 1 (treat day 1 as a warm-up day), and from day 2 on a
user's first appearance in the files is exactly their arrival. New users arrive every day
(including day 1) at a time of day drawn from a diurnal profile; their first impression is
their arrival. About `new_user_share` of each day's impressions come from users within
`NEW_USER_HOURS` of their first impression (a user arriving at 20:00 is still new until 20:00
the next day). Returning new users come back less often and watch less for a few days.

Behaviour model
---------------
Users have latent factors p_u (8-d), an engagement bias b_u and a like bias c_u; videos have
latent factors q_v (partly shared with their primary tag), a quality z_v, a popularity and a
duration (l_v = ln(duration / 30 s)). For an impression, with n = 1 when the user is new::

    a      = <p_u, q_v>                                   (Var a ~ 1)
    s      = a + 0.6 z_v + T0[tag_v] + b_u                (regular users)
    s      = 0.3 a + 0.3 z_v + T1[tag_v] + b_u            (new users; T1 = 0.2 T0 + noise)
    finish ~ Bernoulli(sigmoid(alpha_n + 0.8 s - beta_n l_v))
             (alpha, beta) = (-1.8, 0.6) regular, (0.3, 1.6) new
    play   = duration * (1 + Exp(rho_n))                  if finished (replays; rho = 0.3, 0.15)
           = duration * sigmoid(mu_n + 0.7 s + Logistic)  otherwise (mu = -1.3 regular, -2.3 new)
    like   ~ Bernoulli(sigmoid(lambda_n + 0.9 s + c_u + 1.2 finish))   (lambda = -5.6, -4.2)
    click, follow, comment, forward, hate, profile entry: logistic in s (and like/follow)
    long_view = play >= duration if duration <= 18 s, else play >= 18 s   (KuaiRand's rule)

So new users view fewer videos a day, finish more of them (short ones), watch less per play
and like more, as in the POSO paper's Fig. 1a (at the defaults, new vs regular: about 3.4 vs
6 views per user-day, 29% vs 17% finished, 39 s vs 56 s per play, 4.4% vs 2.3% liked). And
because their tag preferences and their duration sensitivity differ from regular users' (not
just their base rates), a ranker that ignores newness orders videos for new users by regular
users' tastes: ranking new users' long views by duration as learned from all users is about
as bad as chance, while the same ranking learned from new users has an AUC of about 0.6.

These constants are the "default" preset; `Behaviour` holds them and PRESETS has the others:
"none" (new users respond exactly as regular users) and "submergence" (no personal-affinity
term and quality weighing 0.3 for everyone, so rankings follow the video's tag and duration;
new users' tag effects are independent of regular users' and their finish logit falls with
log duration at 1.6 against regular users' 0.3). Only the responses differ between presets:
the same seed gives the same users, videos and times.

Truth: every label above is drawn from a probability given the impression (long_view from
finish and play: P = p_f + (1 - p_f) * sigmoid(mu_n + 0.7 s - logit(18 s / duration)) for
videos over 18 s, p_f otherwise; like, follow, comment, forward and profile entry
marginalized over the labels they depend on). TRUTH_FILE holds these, keyed by the log row.

Exposure: 97% of impressions are drawn by popularity times freshness among videos uploaded
by that date, 3% uniformly (`is_rand` = 1). Times of day follow a diurnal profile.

Real KuaiRand features
----------------------
With `kuairand_dir`, users and videos are rows of the real `user_features_pure.csv` and
`video_features_basic_pure.csv`; their values are copied verbatim, except `upload_dt`: the
real files hold only three upload dates, so upload dates are remapped relative to the
generated dates (keeping the real dates' order) so that item ages span from months before the
first date to videos uploaded during it. If a run needs more users than the file has, the
extra users are copies of random real rows with new ids above the largest real id. Videos
are the real videos only (no copies).

Determinism
-----------
The same arguments give byte-identical files. Everything a day depends on is drawn from
streams keyed by (seed, day) or (seed, user block), never by how many days are generated, so
a run over more days reproduces a shorter run's days exactly (its feature files list more
users and videos). Rows are simulated and written in chunks of users, so memory is bounded
by the population, not by the number of impressions.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import queue
import sys
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pa_compute
import pyarrow.csv as pa_csv

from components.impression_logs import DAY_MS, LOGS_DIR, USER_TABLE_FILE, VIDEO_TABLE_FILE, day_dir
from feature_specs import specs

__all__ = ["generate", "add_arguments", "run", "main", "read_truth", "Behaviour", "PRESETS", "LOG_FILE_FORMATS",
           "REAL_USER_FILE", "REAL_VIDEO_FILE", "TRUTH_FILE", "TRUTH_KEY", "TRUTH_LABELS", "LOG_ROW"]

_log = logging.getLogger(__name__)

LOG_FILE_FORMATS = ("csv", "parquet")
# Beside each day's log: every label's true probability per impression. An Arrow IPC file, so the
# product's readers (components.impression_logs: *.csv, *.parquet) never take it for a log.
TRUTH_FILE = "truth.arrow"
LOG_ROW = "log_row"  # 1-based data row of the impression in the day's log (the header is row 0)
TRUTH_KEY = (LOG_ROW, specs.USER_ID, specs.VIDEO_ID, specs.TIME_MS)
REAL_USER_FILE = "user_features_pure.csv"
REAL_VIDEO_FILE = "video_features_basic_pure.csv"

# Column names, taken from the published schemas in feature_specs (unpacking fails loudly if
# a schema changes shape).
(_L_USER, _L_VIDEO, _L_DATE, _L_HOURMIN, _L_TIME, _L_CLICK, _L_LIKE, _L_FOLLOW, _L_COMMENT,
 _L_FORWARD, _L_HATE, _L_LONG_VIEW, _L_PLAY, _L_DURATION, _L_PROFILE_STAY, _L_COMMENT_STAY,
 _L_PROFILE_ENTER, _L_RAND, _L_TAB) = specs.LOG_COLUMNS
(_U_ID, _U_DEGREE, _U_LOWACTIVE, _U_LIVE_STREAMER, _U_AUTHOR, _U_FOLLOW, _U_FOLLOW_RANGE,
 _U_FANS, _U_FANS_RANGE, _U_FRIEND, _U_FRIEND_RANGE, _U_REGISTER, _U_REGISTER_RANGE,
 *_U_ONEHOT) = specs.USER_TABLE_COLUMNS
(_V_ID, _V_AUTHOR, _V_TYPE, _V_UPLOAD_DT, _V_UPLOAD_TYPE, _V_VISIBLE, _V_DURATION, _V_WIDTH,
 _V_HEIGHT, _V_MUSIC, _V_MUSIC_TYPE, _V_TAG) = specs.VIDEO_TABLE_COLUMNS
# The log's 0/1 labels, whose probabilities TRUTH_FILE holds (under the same names).
TRUTH_LABELS = (_L_CLICK, _L_LIKE, _L_FOLLOW, _L_COMMENT, _L_FORWARD, _L_HATE, _L_LONG_VIEW, _L_PROFILE_ENTER)

_HOUR_MS = 3_600_000
_NEW_USER_MS = specs.NEW_USER_HOURS * _HOUR_MS
_NEVER_MS = -(2 ** 62)          # first appearance of pre-existing users: long before the data
_PRE_EXISTING_DAY = -(2 ** 30)  # arrival day of pre-existing users

# Random streams (the second SeedSequence word); their values must never change.
_S_USER_LATENT, _S_USER_TABLE, _S_USER_TABLE_PARAMS, _S_REAL_USER_ORDER, _S_CLONES = 1, 2, 3, 4, 5
_S_VIDEO_TABLE, _S_VIDEO_LATENT, _S_UPLOAD, _S_DAY, _S_ROWS, _S_WORLD = 6, 7, 8, 9, 10, 11
_S_USER_DEGREE = 12

# A feature table: column name -> values (numpy; text as object arrays or Arrow string arrays).
_Table = Dict[str, object]

# Population sizes.
_USERS_PER_DAILY_IMPRESSION = 0.15
_MIN_USERS, _MIN_VIDEOS = 3000, 2000
_VIDEOS_PER_DAILY_IMPRESSION = 0.1
_USER_BLOCK = 4096          # users' attributes are drawn per block of this many users
_CHUNK_ROWS = 1 << 18       # log rows simulated and written at a time
_TABLE_CHUNK_ROWS = 1 << 16  # feature-table rows formatted at a time

# Arrivals and activity.
_MEAN_FIRST_DAY_VIEWS = 3.5     # a new user's impressions on the arrival day
_FIRST_SESSION_MS = 3 * _HOUR_MS  # the arrival day's impressions fall within this session
_NEXT_DAY_RETENTION = 0.6       # returning probability the day after arrival, relative
_RAND_SHARE = 0.03              # impressions with uniformly random videos (is_rand = 1)
_FRESHNESS_DAYS = 7.0
_UPLOAD_HORIZON_DAYS = 30       # videos uploaded during the data: within this many days
_UPLOAD_IN_WINDOW_SHARE = 0.3
# (daily active probability, relative intensity) by user_active_degree.
_ACTIVITY = {
    "full_active": (0.92, 1.3), "high_active": (0.75, 1.0), "middle_active": (0.45, 0.7),
    "low_active": (0.2, 0.5), "single_low_active": (0.08, 0.4), "2_14_day_new": (0.55, 0.8),
    "30day_retention": (0.3, 0.6), "day_new": (0.5, 0.7), "UNKNOWN": (0.5, 0.8),
}
_DEFAULT_ACTIVITY = (0.5, 0.8)
# Share of each hour of the (local) day in the traffic: quiet nights, evening peak.
_DIURNAL = np.array([20, 12, 8, 6, 6, 8, 15, 30, 40, 45, 45, 50, 55, 50, 45, 45, 48, 50, 55, 62, 68, 70, 65, 40],
                    dtype=np.float64)
_DIURNAL_CDF = np.concatenate([[0.0], np.cumsum(_DIURNAL / _DIURNAL.sum())])
_TAB_WEIGHTS = np.array([20, 45, 8, 3, 12, 2, 5, 1, 1, 1, 0.5, 0.5, 0.5, 0.3, 0.2], dtype=np.float64)

# Behaviour model (see the module docstring and Behaviour).
_LATENT_DIM = 8
_LONG_VIEW_MS = 18_000


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """How users respond to an impression; pairs are (regular users, new users).

    interest s = personal * <p_u, q_v> + quality * z_v + T[tag_v] + b_u, with new users' tag
    effects T1 = new_tag_shared * T0 + new_tag_noise * N(0, 1); finish, partial play, like,
    click and follow logits as in the module docstring, with these constants.
    """

    personal: Tuple[float, float] = (1.0, 0.3)
    quality: Tuple[float, float] = (0.6, 0.3)
    finish_base: Tuple[float, float] = (-1.8, 0.3)
    finish_duration: Tuple[float, float] = (0.6, 1.6)
    partial_base: Tuple[float, float] = (-1.3, -2.3)
    replay_mean: Tuple[float, float] = (0.3, 0.15)
    like_base: Tuple[float, float] = (-5.6, -4.2)
    click_base: Tuple[float, float] = (-0.8, -0.6)
    follow_base: Tuple[float, float] = (-7.2, -6.6)
    new_tag_shared: float = 0.2
    new_tag_noise: float = 0.6

    def regular_for_new(self) -> "Behaviour":
        """The same world with new users responding exactly as regular users do."""
        pairs = {f.name: (getattr(self, f.name)[0],) * 2 for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), tuple)}
        return dataclasses.replace(self, new_tag_shared=1.0, new_tag_noise=0.0, **pairs)


# Presets of `generate(preset=...)` / `poso generate --preset`. Fixed from the generator's ground
# truth and a plain baseline only (benchmarks/README.md, "Headroom"), before any model was
# compared on them.
_SUBMERGENCE = Behaviour(
    # Rankings follow the video (quality, tag, duration), which the features carry, not a user's
    # latent taste, which a model could not learn for a user seen a few times.
    personal=(0.0, 0.0), quality=(0.3, 0.3),
    # New users like other tags and short videos much more than regular users do.
    finish_duration=(0.3, 1.6), new_tag_shared=0.0, new_tag_noise=1.0,
)
PRESETS: Dict[str, Behaviour] = {
    "default": Behaviour(),
    "none": Behaviour().regular_for_new(),
    "submergence": _SUBMERGENCE,
}

# Synthetic feature tables: marginals close to KuaiRand-Pure's.
_DEGREE_WEIGHTS = {
    "full_active": 17959, "high_active": 6158, "middle_active": 2133, "2_14_day_new": 635, "low_active": 300,
    "single_low_active": 68, "30day_retention": 15, "day_new": 11, "UNKNOWN": 6,
}
_FRIEND_RANGES = ("0", "[1,5)", "[5,30)", "[30,60)", "[60,120)", "[120,250)", "250+")
# Upper edges of the count ranges, in each range vocabulary's order (see _bucketize).
_FOLLOW_EDGES, _FOLLOW_RIGHT_CLOSED = (0, 10, 50, 100, 150, 250, 500), True
_FANS_EDGES, _FANS_RIGHT_CLOSED = (1, 10, 100, 1_000, 5_000, 10_000, 100_000, 1_000_000), False
_FRIEND_EDGES, _FRIEND_RIGHT_CLOSED = (1, 5, 30, 60, 120, 250), False
_REGISTER_EDGES, _REGISTER_RIGHT_CLOSED = (14, 30, 60, 90, 180, 365, 730), True
# Cardinalities of onehot_feat0..17 in KuaiRand-Pure; which of them the file writes as floats.
_ONEHOT_CARDINALITY = (2, 7, 50, 1471, 15, 34, 3, 118, 454, 7, 5, 5, 2, 2, 2, 2, 2, 2)
_ONEHOT_FLOAT = frozenset({4, 12, 13, 14, 15, 16, 17})
_UPLOAD_TYPE_WEIGHTS = (2925, 2416, 917, 879, 143, 73, 64, 40, 20, 10, 6, 4, 2)
_N_TAG_IDS, _N_TAGS_USED = 68, 46


def _rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, *keys])))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _bernoulli(rng: np.random.Generator, logits: np.ndarray) -> np.ndarray:
    return rng.random(logits.shape[0]) < _sigmoid(logits)


def _mix(p_cause: np.ndarray, logits: np.ndarray, effect: float) -> np.ndarray:
    """P(label) when label ~ Bernoulli(sigmoid(logits + effect * cause)), cause ~ Bernoulli(p_cause)."""
    return p_cause * _sigmoid(logits + effect) + (1.0 - p_cause) * _sigmoid(logits)


def _sample_time_of_day(rng: np.random.Generator, n: int) -> np.ndarray:
    """Milliseconds since midnight, following the diurnal profile."""
    hour = np.searchsorted(_DIURNAL_CDF, rng.random(n), side="right") - 1
    return np.minimum(hour, 23) * _HOUR_MS + (rng.random(n) * _HOUR_MS).astype(np.int64)


def _traffic_before(time_of_day_ms: np.ndarray) -> np.ndarray:
    """Share of a day's traffic before each time of day."""
    hours = time_of_day_ms / _HOUR_MS
    whole = np.minimum(hours.astype(np.int64), 23)
    return _DIURNAL_CDF[whole] + (hours - whole) * (_DIURNAL_CDF[whole + 1] - _DIURNAL_CDF[whole])


def _bucketize(values: np.ndarray, edges: Sequence[int], right_closed: bool, labels: Sequence[str]) -> np.ndarray:
    """The range label of each count, e.g. 37 -> "(10,50]"."""
    index = np.searchsorted(np.asarray(edges), values, side="left" if right_closed else "right")
    return np.asarray(labels, dtype=object)[index]


def _categorical(rng: np.random.Generator, weights: Sequence[float], n: int) -> np.ndarray:
    cdf = np.cumsum(np.asarray(weights, dtype=np.float64))
    return np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(n), side="right"), len(cdf) - 1)


# ---------------------------------------------------------------------------
# Feature tables
# ---------------------------------------------------------------------------
def _read_real_table(path: str, columns: Sequence[str]) -> _Table:
    """A KuaiRand feature file as text, exactly as written (no type conversion)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"KuaiRand feature file {path} is missing")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(table.columns) != list(columns):
        missing = [c for c in columns if c not in table.columns]
        extra = [c for c in table.columns if c not in columns]
        raise ValueError(f"{path}: columns differ from the KuaiRand schema (missing {missing}, unexpected {extra}, "
                         f"expected order {list(columns)})")
    if table.empty:
        raise ValueError(f"{path}: no rows")
    ids = pd.to_numeric(table[columns[0]], errors="coerce")
    if ids.isna().any():
        row = int(np.flatnonzero(ids.isna().to_numpy())[0]) + 1
        raise ValueError(f"{path}, row {row}: {columns[0]}={table[columns[0]].iloc[row - 1]!r} is not an integer")
    return {name: table[name].to_numpy(object) for name in columns}


def _user_table_params(seed: int) -> List[np.ndarray]:
    """Category weights of the synthetic onehot features (shared by all user blocks)."""
    rng = _rng(seed, _S_USER_TABLE_PARAMS)
    return [rng.dirichlet(np.full(card, 0.5)) for card in _ONEHOT_CARDINALITY]


def _synthetic_degrees(seed: int, block: int) -> np.ndarray:
    """user_active_degree of user ids block * _USER_BLOCK + [0, _USER_BLOCK)."""
    rng = _rng(seed, _S_USER_DEGREE, block)
    return np.asarray(tuple(_DEGREE_WEIGHTS), dtype=object)[_categorical(rng, tuple(_DEGREE_WEIGHTS.values()),
                                                                         _USER_BLOCK)]


def _synthetic_user_block(seed: int, block: int, onehot_weights: Sequence[np.ndarray]) -> _Table:
    """USER_TABLE_COLUMNS rows for user ids block * _USER_BLOCK + [0, _USER_BLOCK)."""
    rng, n = _rng(seed, _S_USER_TABLE, block), _USER_BLOCK
    follow = np.clip(np.exp(rng.normal(np.log(155), 1.4, n)), 0, 5003).astype(np.int64)
    fans = np.clip(np.exp(rng.normal(np.log(48), 1.9, n)), 0, 2_000_000).astype(np.int64)
    fans[rng.random(n) < 0.04] = 0
    friend = np.clip(np.exp(rng.normal(np.log(17), 1.8, n)) - 1, 0, 5000).astype(np.int64)
    register = np.clip(14 + rng.gamma(3.0, 400.0, n), 14, 3624).astype(np.int64)
    columns = {
        _U_ID: block * _USER_BLOCK + np.arange(n, dtype=np.int64),
        _U_DEGREE: _synthetic_degrees(seed, block),
        _U_LOWACTIVE: np.zeros(n, dtype=np.int64),
        _U_LIVE_STREAMER: np.where(rng.random(n) < 0.23, 1, specs.MISSING_VALUE),
        _U_AUTHOR: (rng.random(n) < 0.82).astype(np.int64),
        _U_FOLLOW: follow,
        _U_FOLLOW_RANGE: _bucketize(follow, _FOLLOW_EDGES, _FOLLOW_RIGHT_CLOSED,
                                    specs.feature(_U_FOLLOW_RANGE).vocabulary),
        _U_FANS: fans,
        _U_FANS_RANGE: _bucketize(fans, _FANS_EDGES, _FANS_RIGHT_CLOSED, specs.feature(_U_FANS_RANGE).vocabulary),
        _U_FRIEND: friend,
        _U_FRIEND_RANGE: _bucketize(friend, _FRIEND_EDGES, _FRIEND_RIGHT_CLOSED, _FRIEND_RANGES),
        _U_REGISTER: register,
        _U_REGISTER_RANGE: _bucketize(register, _REGISTER_EDGES, _REGISTER_RIGHT_CLOSED,
                                      specs.feature(_U_REGISTER_RANGE).vocabulary),
    }
    for j, (name, weights) in enumerate(zip(_U_ONEHOT, onehot_weights)):
        values = _categorical(rng, weights, n)
        if j in _ONEHOT_FLOAT:  # KuaiRand writes these as floats, 3% missing
            values = np.where(rng.random(n) < 0.03, np.nan, values.astype(np.float64))
        columns[name] = values
    return columns


def _synthetic_video_table(seed: int, n: int) -> Tuple[_Table, np.ndarray]:
    """VIDEO_TABLE_COLUMNS rows for video ids [0, n) and their primary tags.

    upload_dt is filled in at write time.
    """
    rng = _rng(seed, _S_VIDEO_TABLE)
    tag_ids = np.sort(rng.choice(np.arange(1, _N_TAG_IDS + 1), _N_TAGS_USED, replace=False))
    tag_weights = rng.permutation(1.0 / np.arange(1, _N_TAGS_USED + 1) ** 1.1)
    first = tag_ids[_categorical(rng, tag_weights, n)]
    second = tag_ids[_categorical(rng, tag_weights, n)]
    two = (rng.random(n) < 0.25) & (second != first)
    first_text = pa_compute.cast(pa.array(first), pa.string())
    tags = pa_compute.if_else(pa.array(two), pa_compute.binary_join_element_wise(
        first_text, pa_compute.cast(pa.array(second), pa.string()), ","), first_text)
    untagged = rng.random(n) < 0.01
    tags = pa_compute.if_else(pa.array(untagged), "", tags)
    first[untagged] = 0
    duration = np.clip(np.exp(rng.normal(np.log(80_000), 0.9, n)), 5_000, 1_200_000).round()
    duration[rng.random(n) < 0.03] = np.nan
    n_authors = max(1, int(0.85 * n))
    authors = rng.integers(1, 8_800_000, n_authors)
    shape = _categorical(rng, (75, 20, 5), n)
    music = rng.integers(5_000_000_000, 9_200_000_000, n)
    music[rng.random(n) < 0.03] = 0
    music_type = np.array([9.0, 4.0, 8.0, np.nan])[_categorical(rng, (88, 9, 0.5, 2.5), n)]
    table = {
        _V_ID: np.arange(n, dtype=np.int64),
        _V_AUTHOR: authors[(n_authors * rng.random(n) ** 1.5).astype(np.int64)],
        _V_TYPE: np.array(["NORMAL", "AD"], dtype=object)[(rng.random(n) < 0.01).astype(np.intp)],
        _V_UPLOAD_DT: np.full(n, "", dtype=object),
        _V_UPLOAD_TYPE: np.asarray(specs.feature(_V_UPLOAD_TYPE).vocabulary, dtype=object)[
            _categorical(rng, _UPLOAD_TYPE_WEIGHTS, n)],
        _V_VISIBLE: np.zeros(n),
        _V_DURATION: duration,
        _V_WIDTH: np.array([720.0, 1280.0, 1080.0])[shape],
        _V_HEIGHT: np.array([1280.0, 720.0, 1920.0])[shape],
        _V_MUSIC: music,
        _V_MUSIC_TYPE: music_type,
        _V_TAG: tags,
    }
    return table, first


def _primary_tags(tags: np.ndarray) -> np.ndarray:
    """The first id of each comma-separated tag list (0 when there is none)."""
    first = pd.Series(tags, dtype=object).astype(str).str.split(",").str[0].str.strip()
    return np.maximum(pd.to_numeric(first, errors="coerce").fillna(0).to_numpy(np.float64), 0).astype(np.int64)


def _take(table: _Table, rows: np.ndarray) -> _Table:
    return {name: values.take(pa.array(rows)) if isinstance(values, pa.Array) else values[rows]
            for name, values in table.items()}


def _table_chunks(table: _Table, chunk_rows: int = _TABLE_CHUNK_ROWS) -> Iterator[_Table]:
    n = len(next(iter(table.values())))
    for start in range(0, n, chunk_rows):
        rows = np.arange(start, min(n, start + chunk_rows))
        yield _take(table, rows)


def _csv_text(values) -> pa.Array:
    """Values as CSV fields written the way KuaiRand's files are (pandas' to_csv style).

    Integers as is; floats with a decimal point ("87433.0"), missing as empty; text quoted
    only when it holds a comma, quote or line break.
    """
    if isinstance(values, pa.Array):
        return _quote_text(values.cast(pa.string()).fill_null(""))
    if values.dtype.kind in "iub":
        return pa_compute.cast(pa.array(values.astype(np.int64)), pa.string())
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        whole = finite & (values == np.round(values)) & (np.abs(values) < 2 ** 53)
        as_whole = pa_compute.binary_join_element_wise(pa_compute.cast(
            pa.array(np.where(whole, values, 0).astype(np.int64)), pa.string()), ".0", "")
        as_float = pa_compute.cast(pa.array(np.where(finite, values, 0.0)), pa.string())
        text = pa_compute.if_else(pa.array(whole), as_whole, as_float)
        return pa_compute.if_else(pa.array(finite), text, "")
    return _quote_text(pa.array(values, type=pa.string(), from_pandas=True).fill_null(""))


def _quote_text(text: pa.Array) -> pa.Array:
    needs_quotes = pa_compute.match_substring_regex(text, '[,"\\r\\n]')
    quoted = pa_compute.binary_join_element_wise(
        '"', pa_compute.replace_substring(text, '"', '""'), '"', "")
    return pa_compute.if_else(needs_quotes, quoted, text)


def _csv_bytes(table: _Table, columns: Sequence[str]) -> bytes:
    """The CSV lines (no header) of a table, in `columns` order."""
    lines = pa_compute.binary_join_element_wise(*[_csv_text(table[name]) for name in columns], ",")
    lines = pa_compute.binary_join_element_wise(lines, "\n", "")
    if len(lines) == 0:
        return b""
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)[lines.offset:lines.offset + len(lines) + 1]
    return lines.buffers()[2].to_pybytes()[offsets[0]:offsets[-1]]


# ---------------------------------------------------------------------------
# The simulated world
# ---------------------------------------------------------------------------
class _Videos:
    """The video catalogue: what the behaviour model and exposure need per video."""

    def __init__(self, seed: int, table: _Table, primary_tag: np.ndarray, real_upload_rank: Optional[np.ndarray],
                 behaviour: "Behaviour"):
        n = len(primary_tag)
        self.table, self.tag = table, primary_tag
        self.ids = pd.to_numeric(pd.Series(table[_V_ID])).to_numpy(np.int64)
        duration = pd.to_numeric(pd.Series(table[_V_DURATION]), errors="coerce").to_numpy(np.float64)
        is_ad = table[_V_TYPE] == "AD"

        rng = _rng(seed, _S_VIDEO_LATENT)
        n_tags = int(self.tag.max()) + 1
        scale = _LATENT_DIM ** -0.25  # so that Var <p_u, q_v> ~ 1
        centroids = rng.normal(0.0, scale, (n_tags, _LATENT_DIM))
        self.latent = (0.8 * centroids[self.tag] + 0.6 * rng.normal(0.0, scale, (n, _LATENT_DIM))).astype(np.float32)
        self.quality = (rng.normal(0.0, 1.0, n) - 0.5 * is_ad).astype(np.float32)
        self.popularity = np.exp(0.7 * self.quality + rng.normal(0.0, 0.8, n))
        self.tag_effect_regular = rng.normal(0.0, 0.5, n_tags).astype(np.float32)
        # Drawn as N(0, 1) and scaled, so that every preset keeps the same later draws.
        self.tag_effect_new = (behaviour.new_tag_shared * self.tag_effect_regular
                               + behaviour.new_tag_noise * rng.normal(0.0, 1.0, n_tags)).astype(np.float32)
        imputed = np.clip(np.exp(rng.normal(np.log(80_000), 0.9, n)), 5_000, 1_200_000)
        # The log's duration_ms is always present, even where the feature file lacks it.
        self.duration_ms = np.where(np.isfinite(duration) & (duration > 0), duration, imputed).round().astype(np.int64)
        self.log_duration = np.log(self.duration_ms / 30_000.0).astype(np.float32)

        upload = _rng(seed, _S_UPLOAD)
        in_window = upload.random(n) < _UPLOAD_IN_WINDOW_SHARE
        before = -1 - np.minimum(np.floor(upload.exponential(20.0, n)), 364).astype(np.int64)
        offsets = np.where(in_window, upload.integers(0, _UPLOAD_HORIZON_DAYS, n), before)
        if real_upload_rank is not None:  # keep the real upload dates' order
            offsets = np.sort(offsets)[real_upload_rank]
        self.upload_day = offsets  # relative to the first generated date
        self.seen = np.zeros(n, dtype=bool)

    def exposure(self, day: int) -> Tuple[np.ndarray, np.ndarray]:
        """Videos available on `day` and the cumulative exposure weights of the popularity policy."""
        eligible = np.flatnonzero(self.upload_day <= day)
        if eligible.size == 0:
            raise ValueError(f"no video is uploaded by day {day}")
        age = (day - self.upload_day[eligible]).astype(np.float64)
        weights = self.popularity[eligible] * (0.3 + np.exp(-age / _FRESHNESS_DAYS))
        return eligible, np.cumsum(weights)


class _Users:
    """Users in order of appearance; attributes are drawn per block of _USER_BLOCK users.

    Index i's attributes depend only on (seed, i // _USER_BLOCK), so runs of any length agree.
    """

    def __init__(self, seed: int, real_table: Optional[_Table]):
        self._seed, self._real = seed, real_table
        self._onehot_weights = _user_table_params(seed)
        if real_table is not None:
            self._real_ids = pd.to_numeric(pd.Series(real_table[_U_ID])).to_numpy(np.int64)
            self._real_degree = real_table[_U_DEGREE]
            self._real_order = _rng(seed, _S_REAL_USER_ORDER).permutation(len(self._real_ids))
        self.n = 0  # users created so far (pre-existing first, then arrivals in order)
        self._capacity = 0
        self.latent = np.zeros((0, _LATENT_DIM), np.float32)
        self.bias = np.zeros(0, np.float32)
        self.like_bias = np.zeros(0, np.float32)
        self.p_active = np.zeros(0, np.float64)
        self.intensity = np.zeros(0, np.float64)
        self.user_id = np.zeros(0, np.int64)
        self.source_row = np.zeros(0, np.int64)   # real mode: the real row each user copies
        self.arrival_day = np.zeros(0, np.int64)
        self.first_ms = np.zeros(0, np.int64)
        self.seen = np.zeros(0, bool)

    def add(self, count: int, arrival_day: int, first_ms: np.ndarray) -> np.ndarray:
        self._reserve(self.n + count)
        index = np.arange(self.n, self.n + count)
        self.arrival_day[index] = arrival_day
        self.first_ms[index] = first_ms
        self.n += count
        return index

    def _reserve(self, n: int) -> None:
        if n <= self._capacity:
            return
        # Grow by at least a quarter so that daily arrivals rarely copy the population.
        blocks = range(self._capacity // _USER_BLOCK, -(-max(n, self._capacity * 5 // 4) // _USER_BLOCK))
        old, capacity = self._capacity, blocks.stop * _USER_BLOCK
        grown = {}
        for name, fill in (("latent", 0), ("bias", 0), ("like_bias", 0), ("p_active", 0), ("intensity", 0),
                           ("user_id", 0), ("source_row", 0), ("arrival_day", _PRE_EXISTING_DAY),
                           ("first_ms", _NEVER_MS), ("seen", False)):
            current = getattr(self, name)
            grown[name] = np.full((capacity,) + current.shape[1:], fill, current.dtype)
            grown[name][:old] = current
        for block in blocks:
            at = slice(block * _USER_BLOCK, (block + 1) * _USER_BLOCK)
            for name, values in self._block(block).items():
                grown[name][at] = values
        for name, values in grown.items():
            setattr(self, name, values)
        self._capacity = capacity

    def _block(self, block: int) -> Dict[str, np.ndarray]:
        rng, n = _rng(self._seed, _S_USER_LATENT, block), _USER_BLOCK
        index = block * _USER_BLOCK + np.arange(n, dtype=np.int64)
        scale = _LATENT_DIM ** -0.25
        attrs = {
            "latent": rng.normal(0.0, scale, (n, _LATENT_DIM)).astype(np.float32),
            "bias": rng.normal(0.0, 0.5, n).astype(np.float32),
            "like_bias": rng.normal(0.0, 0.7, n).astype(np.float32),
        }
        intensity = rng.lognormal(0.0, 0.6, n)
        if self._real is None:
            degree = _synthetic_degrees(self._seed, block)
            attrs["user_id"], attrs["source_row"] = index, np.full(n, -1, np.int64)
        else:
            n_real = len(self._real_order)
            clones = _rng(self._seed, _S_CLONES, block).integers(0, n_real, n)
            is_real = index < n_real
            rows = np.where(is_real, self._real_order[np.minimum(index, n_real - 1)], clones)
            attrs["source_row"] = rows
            attrs["user_id"] = np.where(is_real, self._real_ids[rows], self._real_ids.max() + 1 + index - n_real)
            degree = self._real_degree[rows]
        activity = np.array([_ACTIVITY.get(d, _DEFAULT_ACTIVITY) for d in degree], dtype=np.float64)
        attrs["p_active"], attrs["intensity"] = activity[:, 0], activity[:, 1] * intensity
        return attrs

    def feature_rows(self) -> Iterator[_Table]:
        """USER_TABLE_COLUMNS rows of the users who appeared, in blocks, by ascending id."""
        seen = np.flatnonzero(self.seen[:self.n])
        if self._real is not None:
            seen = seen[np.argsort(self.user_id[seen], kind="stable")]
            rows = _take(self._real, self.source_row[seen])
            rows[_U_ID] = self.user_id[seen]
            yield from _table_chunks(rows)
            return
        blocks = seen // _USER_BLOCK
        starts = np.flatnonzero(np.diff(blocks, prepend=-1))
        parts, rows = [], 0
        for lo, hi in zip(starts, np.append(starts[1:], seen.size)):
            block = int(blocks[lo])
            table = _synthetic_user_block(self._seed, block, self._onehot_weights)
            parts.append(_take(table, seen[lo:hi] - block * _USER_BLOCK))
            rows += hi - lo
            if rows >= _TABLE_CHUNK_ROWS or hi == seen.size:  # format many blocks at once
                yield {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
                parts, rows = [], 0


class _DayPlan:
    """Who is active on a day and how many impressions each has."""

    def __init__(self, users: np.ndarray, counts: np.ndarray, arriving: np.ndarray):
        self.users, self.counts, self.arriving = users, counts, arriving

    def chunks(self) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        ends = np.cumsum(self.counts)
        cuts = np.searchsorted(ends, np.arange(_CHUNK_ROWS, int(ends[-1]) if ends.size else 0, _CHUNK_ROWS),
                               side="left") + 1
        bounds = np.unique(np.concatenate([[0], cuts, [len(self.users)]]))
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            yield self.users[lo:hi], self.counts[lo:hi], self.arriving[lo:hi]


class _World:
    def __init__(self, seed: int, start: datetime.date, impressions_per_day: int, new_user_share: float,
                 kuairand_dir: Optional[str], behaviour: Behaviour):
        self.seed, self.start, self.behaviour = seed, start, behaviour
        self.rows_per_day, self.new_user_share = impressions_per_day, new_user_share
        if kuairand_dir is not None:
            user_table = _read_real_table(os.path.join(kuairand_dir, REAL_USER_FILE), specs.USER_TABLE_COLUMNS)
            video_table = _read_real_table(os.path.join(kuairand_dir, REAL_VIDEO_FILE), specs.VIDEO_TABLE_COLUMNS)
            n_videos = len(video_table[_V_ID])
            tiebreak = _rng(seed, _S_WORLD).random(n_videos)
            upload_order = np.lexsort((tiebreak, video_table[_V_UPLOAD_DT].astype(str)))
            upload_rank = np.empty(n_videos, np.int64)
            upload_rank[upload_order] = np.arange(n_videos)
            self.videos = _Videos(seed, video_table, _primary_tags(video_table[_V_TAG]), upload_rank, behaviour)
        else:
            user_table = None
            n_videos = max(_MIN_VIDEOS, int(round(_VIDEOS_PER_DAILY_IMPRESSION * impressions_per_day)))
            self.videos = _Videos(seed, *_synthetic_video_table(seed, n_videos), None, behaviour)
        self.users = _Users(seed, user_table)
        n_pre = max(int(round(_USERS_PER_DAILY_IMPRESSION * impressions_per_day)),
                    min(_MIN_USERS, impressions_per_day // 4), 1)
        self.users.add(n_pre, _PRE_EXISTING_DAY, np.full(n_pre, _NEVER_MS, np.int64))
        tab_rng = _rng(seed, _S_WORLD, 1)
        self.tab_effect = tab_rng.normal(0.0, 0.3, len(_TAB_WEIGHTS)).astype(np.float32)

    # -- days ---------------------------------------------------------------
    def plan_day(self, day: int) -> _DayPlan:
        """Draws the day's active users, its arrivals and every user's impression count."""
        rng, users, rows = _rng(self.seed, _S_DAY, day), self.users, self.rows_per_day
        day_start = specs.day_start_ms(self.start + datetime.timedelta(days=day))
        known = np.arange(users.n)
        since_arrival = day - users.arrival_day[known]
        p_active = users.p_active[known] * np.where(since_arrival == 1, _NEXT_DAY_RETENTION, 1.0)
        # Every pre-existing user appears on the first day, so that from the second day on a
        # user's first appearance in the files is their arrival.
        active = known if day == 0 else known[rng.random(known.size) < p_active]
        if active.size == 0:
            active = known
        since_arrival = np.minimum(day - users.arrival_day[active], 10 ** 6)
        weights = users.intensity[active] * np.minimum(1.0, 0.5 + 0.25 * since_arrival)

        # Yesterday's arrivals are still new until their arrival time of day: count them in.
        recent = since_arrival == 1
        regular_rows = rows * (1.0 - self.new_user_share)
        carried = regular_rows * float(np.sum(weights[recent] * _traffic_before(
            users.first_ms[active[recent]] + DAY_MS - day_start))) / float(weights.sum())
        n_arrivals = int(round(max(0.0, self.new_user_share * rows - carried) / _MEAN_FIRST_DAY_VIEWS))
        first_day_views = 1 + rng.poisson(_MEAN_FIRST_DAY_VIEWS - 1, n_arrivals)
        first_day_views = first_day_views[np.cumsum(first_day_views) <= rows]
        arrival_times = day_start + _sample_time_of_day(rng, first_day_views.size)
        arrivals = users.add(first_day_views.size, day, arrival_times)

        budget = rows - int(first_day_views.sum())
        floor = 1 if day == 0 and budget >= active.size else 0
        counts = floor + rng.multinomial(budget - floor * active.size, weights / weights.sum())
        keep = counts > 0
        plan = _DayPlan(np.concatenate([active[keep], arrivals]),
                        np.concatenate([counts[keep], first_day_views]).astype(np.int64),
                        np.concatenate([np.zeros(int(keep.sum()), bool), np.ones(arrivals.size, bool)]))
        users.seen[plan.users] = True
        return plan

    def simulate(self, day: int, users: np.ndarray, counts: np.ndarray, arriving: np.ndarray, chunk: int,
                 exposure: Tuple[np.ndarray, np.ndarray],
                 truth: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
        """The log rows of one chunk of a day's users, as LOG_COLUMNS arrays; `truth` (if given)
        receives each TRUTH_LABELS column's probability per row."""
        rng, n = _rng(self.seed, _S_ROWS, day, chunk), int(counts.sum())
        date = self.start + datetime.timedelta(days=day)
        day_start = specs.day_start_ms(date)
        user = np.repeat(users, counts)
        first_ms = self.users.first_ms[user]

        # Times: independent draws over the day; an arriving user's views form one session
        # that starts with the arrival.
        time_of_day = _sample_time_of_day(rng, n)
        session = rng.random(n)
        arriving_row = np.repeat(arriving, counts)
        if arriving.any():
            arrival = first_ms - day_start
            span = np.minimum(_FIRST_SESSION_MS, DAY_MS - 1 - arrival)
            time_of_day = np.where(arriving_row, arrival + (session * span).astype(np.int64), time_of_day)
            first_rows = (np.cumsum(counts) - counts)[arriving]
            time_of_day[first_rows] = arrival[first_rows]
        time_ms = day_start + time_of_day
        new = (time_ms - first_ms < _NEW_USER_MS).astype(np.intp)

        # Exposure.
        eligible, cumulative = exposure
        is_rand = rng.random(n) < _RAND_SHARE
        popular = np.minimum(np.searchsorted(cumulative, rng.random(n) * cumulative[-1], side="right"),
                             eligible.size - 1)
        video = eligible[np.where(is_rand, rng.integers(0, eligible.size, n), popular)]
        self.videos.seen[video] = True
        tab = _categorical(rng, _TAB_WEIGHTS, n)

        # Behaviour (module docstring); each label's probability given the impression is kept
        # as the truth.
        v, u, b = self.videos, self.users, self.behaviour
        affinity = np.einsum("ij,ij->i", u.latent[user], v.latent[video])
        tag = v.tag[video]
        interest = (np.take(b.personal, new) * affinity + np.take(b.quality, new) * v.quality[video]
                    + np.where(new == 1, v.tag_effect_new[tag], v.tag_effect_regular[tag]) + u.bias[user])
        interest = interest.astype(np.float64)
        log_duration = v.log_duration[video]
        finish_logit = np.take(b.finish_base, new) + 0.8 * interest - np.take(b.finish_duration, new) * log_duration
        finished = _bernoulli(rng, finish_logit)
        uniform = rng.uniform(1e-12, 1.0, n)
        noise = np.log(uniform) - np.log1p(-uniform)
        partial_logit = np.take(b.partial_base, new) + 0.7 * interest
        partial = _sigmoid(partial_logit + noise)
        replay = 1.0 + rng.exponential(1.0, n) * np.take(b.replay_mean, new)
        duration = v.duration_ms[video]
        play = np.floor(np.where(finished, replay, np.minimum(partial, 1.0 - 1e-9)) * duration).astype(np.int64)
        finished = play >= duration
        long_view = np.where(duration <= _LONG_VIEW_MS, finished, play >= _LONG_VIEW_MS)

        click_logit = np.take(b.click_base, new) + 0.6 * interest + self.tab_effect[tab]
        like_logit = np.take(b.like_base, new) + 0.9 * interest + u.like_bias[user]
        follow_logit = np.take(b.follow_base, new) + 0.7 * interest
        comment_logit, forward_logit = -6.8 + 0.5 * interest, -7.6 + 0.5 * interest
        hate_logit, profile_logit = -6.5 - 0.9 * interest, -5.0 + 0.5 * interest
        click = _bernoulli(rng, click_logit)
        like = _bernoulli(rng, like_logit + 1.2 * finished)
        follow = _bernoulli(rng, follow_logit + 1.5 * like)
        comment = _bernoulli(rng, comment_logit + 1.5 * like)
        forward = _bernoulli(rng, forward_logit + 1.0 * like)
        hate = _bernoulli(rng, hate_logit)
        profile_enter = _bernoulli(rng, profile_logit + 2.5 * follow)
        profile_stay = np.where(profile_enter, np.ceil(rng.exponential(15_000.0, n)), 0).astype(np.int64)
        comments_open = comment | _bernoulli(rng, -3.5 + 0.4 * interest)
        comment_stay = np.where(comments_open, np.ceil(rng.exponential(20_000.0, n)), 0).astype(np.int64)

        if truth is not None:
            # P(label | impression): the draws above, marginalized over the labels they depend on.
            p_finish = _sigmoid(finish_logit)
            # Not finished: play / duration = sigmoid(partial_logit + Logistic) >= 18 s / duration.
            long_share = np.clip(_LONG_VIEW_MS / duration, 1e-12, 1.0 - 1e-12)
            p_long_play = _sigmoid(partial_logit - np.log(long_share) + np.log1p(-long_share))
            p_like = _mix(p_finish, like_logit, 1.2)
            p_follow = _mix(p_like, follow_logit, 1.5)
            probabilities = {
                _L_LONG_VIEW: np.where(duration <= _LONG_VIEW_MS, p_finish, p_finish + (1 - p_finish) * p_long_play),
                _L_LIKE: p_like, _L_FOLLOW: p_follow, _L_CLICK: _sigmoid(click_logit),
                _L_COMMENT: _mix(p_like, comment_logit, 1.5), _L_FORWARD: _mix(p_like, forward_logit, 1.0),
                _L_HATE: _sigmoid(hate_logit), _L_PROFILE_ENTER: _mix(p_follow, profile_logit, 2.5)}
            truth.update({name: probabilities[name].astype(np.float32) for name in TRUTH_LABELS})

        hourmin = (time_of_day // _HOUR_MS) * 100 + (time_of_day // 60_000) % 60
        as_int = lambda a: np.asarray(a, dtype=np.int64)  # noqa: E731
        columns = {
            _L_USER: u.user_id[user], _L_VIDEO: v.ids[video],
            _L_DATE: np.full(n, int(date.strftime("%Y%m%d")), np.int64), _L_HOURMIN: as_int(hourmin),
            _L_TIME: as_int(time_ms), _L_CLICK: as_int(click), _L_LIKE: as_int(like), _L_FOLLOW: as_int(follow),
            _L_COMMENT: as_int(comment), _L_FORWARD: as_int(forward), _L_HATE: as_int(hate),
            _L_LONG_VIEW: as_int(long_view), _L_PLAY: play, _L_DURATION: duration,
            _L_PROFILE_STAY: profile_stay, _L_COMMENT_STAY: comment_stay, _L_PROFILE_ENTER: as_int(profile_enter),
            _L_RAND: as_int(is_rand), _L_TAB: as_int(tab),
        }
        return {name: columns[name] for name in specs.LOG_COLUMNS}

    def video_feature_rows(self) -> Iterator[_Table]:
        """VIDEO_TABLE_COLUMNS rows of the videos that appeared, in chunks, by ascending id."""
        seen = np.flatnonzero(self.videos.seen)
        seen = seen[np.argsort(self.videos.ids[seen], kind="stable")]
        for start in range(0, seen.size, _TABLE_CHUNK_ROWS):
            chunk = seen[start:start + _TABLE_CHUNK_ROWS]
            rows = _take(self.videos.table, chunk)
            upload = np.datetime64(self.start.isoformat()) + self.videos.upload_day[chunk].astype("timedelta64[D]")
            rows[_V_UPLOAD_DT] = upload.astype(str).astype(object)
            yield rows


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------
_ARROW_SCHEMA = pa.schema([(name, pa.int64()) for name in specs.LOG_COLUMNS])


class _LogWriter:
    """Writes one day's log file chunk by chunk; the file appears under its name when complete.

    Formatting and writing run on a background thread (Arrow releases the GIL), overlapping the
    simulation of the next chunk; at most two chunks wait, so memory stays bounded.
    """

    def __init__(self, path: str, file_format: str):
        self.path, self._tmp = path, path + ".tmp"
        self._pending: "queue.Queue[Optional[Dict[str, np.ndarray]]]" = queue.Queue(maxsize=2)
        self._error: Optional[BaseException] = None
        if file_format == "csv":
            self._sink = pa.OSFile(self._tmp, "wb")
            self._sink.write((",".join(specs.LOG_COLUMNS) + "\n").encode())
            self._writer = pa_csv.CSVWriter(self._sink, _ARROW_SCHEMA,
                                            write_options=pa_csv.WriteOptions(include_header=False))
        else:
            import pyarrow.parquet as pq

            self._sink = None
            self._writer = pq.ParquetWriter(self._tmp, _ARROW_SCHEMA)
        self._thread = threading.Thread(target=self._drain, name=f"write {path}", daemon=True)
        self._thread.start()

    def write(self, columns: Dict[str, np.ndarray]) -> None:
        self._raise_if_failed()
        self._pending.put(columns)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise OSError(f"writing {self.path} failed: {self._error}") from self._error

    def _drain(self) -> None:
        while (columns := self._pending.get()) is not None:
            if self._error is None:
                try:
                    self._writer.write_table(pa.Table.from_pydict(columns, schema=_ARROW_SCHEMA))
                except BaseException as error:  # reported by write() or close()
                    self._error = error

    def close(self, complete: bool = True) -> None:
        """Publishes the file, or (complete=False, or after a failed write) removes it."""
        self._pending.put(None)
        self._thread.join()
        self._writer.close()
        if self._sink is not None:
            self._sink.close()
        if complete and self._error is None:
            os.replace(self._tmp, self.path)
            return
        os.remove(self._tmp)
        if complete:
            self._raise_if_failed()


class _TruthWriter:
    """Writes one day's TRUTH_FILE chunk by chunk (Arrow IPC); it appears under its name when complete."""

    SCHEMA = pa.schema([(LOG_ROW, pa.int64()), (specs.USER_ID, pa.int64()), (specs.VIDEO_ID, pa.int64()),
                        (specs.TIME_MS, pa.int64())] + [(name, pa.float32()) for name in TRUTH_LABELS])

    def __init__(self, path: str):
        self.path, self._tmp, self.rows = path, path + ".tmp", 0
        self._writer = pa.ipc.new_file(self._tmp, self.SCHEMA)

    def write(self, log_columns: Dict[str, np.ndarray], probabilities: Dict[str, np.ndarray]) -> None:
        n = len(log_columns[_L_USER])
        columns = {LOG_ROW: np.arange(self.rows + 1, self.rows + n + 1, dtype=np.int64),
                   **{name: log_columns[name] for name in TRUTH_KEY[1:]}, **probabilities}
        self._writer.write_table(pa.Table.from_pydict(columns, schema=self.SCHEMA))
        self.rows += n

    def close(self, complete: bool = True) -> None:
        self._writer.close()
        if complete:
            os.replace(self._tmp, self.path)
        else:
            os.remove(self._tmp)


def read_truth(day_folder: str) -> pd.DataFrame:
    """A day's TRUTH_FILE: TRUTH_KEY columns, then each TRUTH_LABELS column's probability."""
    path = os.path.join(day_folder, TRUTH_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: logs written by `poso generate` (this version) have it")
    with pa.ipc.open_file(path) as reader:
        return reader.read_pandas()


def _write_table_csv(path: str, parts: Iterator[_Table], columns: Sequence[str]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write((",".join(columns) + "\n").encode())
        for part in parts:
            f.write(_csv_bytes(part, columns))
    os.replace(tmp, path)


def _validate(start_date, days, seed, impressions_per_day, new_user_share, file_format, kuairand_dir,
              preset) -> None:
    if not isinstance(start_date, datetime.date) or isinstance(start_date, datetime.datetime):
        raise TypeError(f"start_date must be a datetime.date, got {start_date!r}")
    for name, value, low in (("days", days, 1), ("seed", seed, 0), ("impressions_per_day", impressions_per_day, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0.0 <= new_user_share <= 0.5:
        raise ValueError(f"new_user_share must be in [0, 0.5], got {new_user_share!r}")
    if file_format not in LOG_FILE_FORMATS:
        raise ValueError(f"file_format must be one of {LOG_FILE_FORMATS}, got {file_format!r}")
    if kuairand_dir is not None and not os.path.isdir(kuairand_dir):
        raise FileNotFoundError(f"KuaiRand directory {kuairand_dir} does not exist")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")


def generate(out_dir: str, start_date: datetime.date, days: int, seed: int, impressions_per_day: int = 20000,
             kuairand_dir: Optional[str] = None, new_user_share: float = 0.05,
             file_format: str = "csv", preset: str = "default") -> List[str]:
    """Writes `days` days of synthetic logs from `start_date` and the feature files under `out_dir`.

    Args:
      out_dir: output root; gets logs/YYYY-MM-DD/log.{csv,parquet} (and TRUTH_FILE beside it: every
        label's true probability per impression, see read_truth), user_features.csv and
        video_features.csv (existing files of those names are replaced; a date folder's log in
        the other format is removed, so each date folder holds exactly one log file).
      start_date: the first date (in feature_specs.LOG_TIMEZONE).
      days: number of consecutive dates.
      seed: the random seed; the same arguments give byte-identical files.
      impressions_per_day: rows per day (exact).
      kuairand_dir: a directory holding KuaiRand's user_features_pure.csv and
        video_features_basic_pure.csv to draw users and videos from; None for a built-in
        synthetic population.
      new_user_share: target share of impressions from users within NEW_USER_HOURS of their
        first impression (realized to within a few percent, relative).
      file_format: "csv" or "parquet" (all columns int64).
      preset: how new users respond, a key of PRESETS: "default" (new users differ from regular
        ones in base rates, tag tastes and duration sensitivity), "none" (new users respond as
        regular ones) or "submergence" (rankings follow the video for regular users; new users'
        tag tastes and duration sensitivity differ). benchmarks/README.md measures each one's
        headroom.

    Returns:
      The paths of the log files written, one per date, in date order.
    """
    _validate(start_date, days, seed, impressions_per_day, new_user_share, file_format, kuairand_dir, preset)
    world = _World(int(seed), start_date, int(impressions_per_day), float(new_user_share), kuairand_dir,
                   PRESETS[preset])
    paths = []
    for day in range(days):
        date = start_date + datetime.timedelta(days=day)
        folder = day_dir(out_dir, date)
        os.makedirs(folder, exist_ok=True)
        for other in LOG_FILE_FORMATS:
            stale = os.path.join(folder, f"log.{other}")
            if other != file_format and os.path.exists(stale):
                os.remove(stale)
        plan = world.plan_day(day)
        exposure = world.videos.exposure(day)
        writer = _LogWriter(os.path.join(folder, f"log.{file_format}"), file_format)
        truth_writer = _TruthWriter(os.path.join(folder, TRUTH_FILE))
        try:
            for chunk, (users, counts, arriving) in enumerate(plan.chunks()):
                probabilities: Dict[str, np.ndarray] = {}
                columns = world.simulate(day, users, counts, arriving, chunk, exposure, probabilities)
                writer.write(columns)
                truth_writer.write(columns, probabilities)
        except BaseException:
            writer.close(complete=False)
            truth_writer.close(complete=False)
            raise
        writer.close()
        truth_writer.close()
        _log.info("wrote %s (%d rows)", writer.path, impressions_per_day)
        paths.append(writer.path)
    _write_table_csv(os.path.join(out_dir, USER_TABLE_FILE), world.users.feature_rows(), specs.USER_TABLE_COLUMNS)
    _write_table_csv(os.path.join(out_dir, VIDEO_TABLE_FILE), world.video_feature_rows(), specs.VIDEO_TABLE_COLUMNS)
    return paths


# ---------------------------------------------------------------------------
# Command line: poso generate
# ---------------------------------------------------------------------------
def _date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (gets logs/, user_features.csv, "
                                                     "video_features.csv)")
    parser.add_argument("--start", required=True, type=_date, help="first date, YYYY-MM-DD")
    parser.add_argument("--days", type=int, default=14, help="number of days (default 14)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--rows-per-day", type=int, default=20000, help="impressions per day (default 20000)")
    parser.add_argument("--kuairand", default=None, metavar="DIR",
                        help=f"draw users and videos from the real {REAL_USER_FILE} and {REAL_VIDEO_FILE} in DIR")
    parser.add_argument("--new-user-share", type=float, default=0.05,
                        help="share of impressions from users in their first NEW_USER_HOURS (default 0.05)")
    parser.add_argument("--format", choices=LOG_FILE_FORMATS, default="csv", help="log file format (default csv)")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="default",
                        help="how new users respond (default: default). default: they differ from regular users "
                             "in base rates, tag tastes and duration sensitivity; none: they respond as regular "
                             "users; submergence: rankings follow the video's tags and duration, new users' tag "
                             "tastes and duration sensitivity differ (the paper benchmark's plain baseline leaves "
                             "4.2 pp of new users' long_view GAUC below the ceiling, 0.9 pp of regular users'; "
                             "none: 4.2 and 6.4 pp, default: 6.3 and 6.4 pp; benchmarks/README.md). Every day also "
                             f"gets logs/DATE/{TRUTH_FILE}, "
                             "each label's true probability per impression (the product ignores it)")
    parser.add_argument("--verbose", action="store_true", help="print the throughput")


def run(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    paths = generate(args.out, args.start, args.days, args.seed, impressions_per_day=args.rows_per_day,
                     kuairand_dir=args.kuairand, new_user_share=args.new_user_share, file_format=args.format,
                     preset=args.preset)
    seconds = time.perf_counter() - began
    rows = args.rows_per_day * args.days
    last = args.start + datetime.timedelta(days=args.days - 1)
    print(f"wrote {rows:,} rows for {args.start.isoformat()}..{last.isoformat()} in {len(paths)} daily files "
          f"under {os.path.join(args.out, LOGS_DIR)}")
    if args.verbose:
        print(f"wrote {rows:,} rows in {len(paths)} daily files under {args.out} in {seconds:.2f} s "
              f"({rows / seconds:,.0f} rows/s)", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="poso generate", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
