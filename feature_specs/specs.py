"""Declarative feature, personalization-code and task specifications.

This module deliberately imports nothing heavier than the standard library so that
data generators and readers can use it without TensorFlow.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import enum
from typing import Optional, Sequence, Tuple

__all__ = [
    "Kind", "Dtype", "Feature", "Task", "PersonalizationCode", "FeatureSet", "KUAIRAND",
    "LOG_COLUMNS", "LOG_INT_COLUMNS", "USER_TABLE_COLUMNS", "VIDEO_TABLE_COLUMNS",
    "FEATURES", "TASKS", "PC", "feature", "features_of_kind", "model_input_features",
    "raw_example_features", "serving_features", "pc_bucket", "user_group",
    "NEW_USER_HOURS", "NEW_ITEM_DAYS", "LOG_TIMEZONE", "day_start_ms", "INACTIVE_DEGREES", "USER_GROUPS",
    "HISTORY_LENGTH", "PADDING_INDEX", "MISSING_VALUE",
    # Column names the Beam step and readers refer to.
    "USER_ID", "VIDEO_ID", "DATE", "HOURMIN", "TIME_MS", "TAB", "AUTHOR_ID", "MUSIC_ID",
    "USER_ACTIVE_DEGREE", "UPLOAD_DT", "VIDEO_DURATION", "TAG", "PLAY_TIME_MS", "DURATION_MS",
    "AVC", "IS_NEW_USER", "ITEM_AGE_DAYS", "HIST_VIDEO_IDS", "HIST_TAGS", "VIDEO_TAGS",
    "HOUR", "USER_GROUP", "AVC_BUCKET", "PC_BUCKET", "SEQUENCE_PADDING_VALUE", "SERVING_MODEL_NAME",
]


class Kind(enum.Enum):
    CATEGORICAL = "categorical"  # one id per example, looked up in a vocabulary or hashed
    NUMERIC = "numeric"          # one float per example, z-scored by Transform
    SEQUENCE = "sequence"        # a variable-length id list (behaviour history), padded
    PERSONALIZATION = "personalization"  # sources of the personalization code
    LABEL = "label"              # a task's 0/1 label
    SLICE = "slice"              # evaluation-only slicing keys; never model inputs


class Dtype(enum.Enum):
    INT64 = "int64"
    FLOAT32 = "float32"
    STRING = "string"


@dataclasses.dataclass(frozen=True)
class Feature:
    """One feature of the examples the Beam step writes.

    vocabulary: fixed string values (index 0 is reserved for out-of-vocabulary).
    hash_buckets: ids are hashed into this many buckets (index 0 reserved for padding).
    max_length: for SEQUENCE features, the history length kept (most recent first).
    """

    name: str
    dtype: Dtype
    kind: Kind
    vocabulary: Optional[Tuple[str, ...]] = None
    hash_buckets: Optional[int] = None
    max_length: Optional[int] = None
    embedding_dim: int = 16
    default: object = None
    description: str = ""

    @property
    def cardinality(self) -> int:
        """Number of indices the model's embedding table needs (including index 0)."""
        if self.vocabulary is not None:
            return len(self.vocabulary) + 1
        if self.hash_buckets is not None:
            return self.hash_buckets + 1
        raise ValueError(f"feature {self.name!r} has neither a vocabulary nor hash buckets")


@dataclasses.dataclass(frozen=True)
class Task:
    """A binary ranking task: its label feature and its weight in the total loss."""

    name: str
    label: str
    loss_weight: float = 1.0
    primary: bool = False


@dataclasses.dataclass(frozen=True)
class PersonalizationCode:
    """The personalization code: a fixed bucketization of a source feature.

    The boundaries are fixed (not computed from each day's data) so that a PC value
    means the same thing across daily retrains.
    """

    source: str
    boundaries: Tuple[int, ...]

    @property
    def num_buckets(self) -> int:
        return len(self.boundaries) + 1


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """Everything the preprocessing, the model and the export need to know about a dataset.

    features: every feature of the raw tf.Examples (names unique).
    tasks: the binary tasks, each reading one LABEL feature.
    pc: the personalization code (its source is a PERSONALIZATION feature).
    behaviour_sequence: the SEQUENCE features the attention reads, concatenated per
      position (one max_length); other SEQUENCE features are mean-pooled inputs.
    user_id: the feature holding each example's user (GAUC's group; a model input only
      if it is CATEGORICAL).
    user_features: the features describing the user other than the id: CATEGORICAL ones (the
      profile) or SEQUENCE ones (the history, mean-pooled): what the user cold-start methods
      (models.cold_start) generate or warm the user-id embedding from.
    """

    name: str
    features: Tuple[Feature, ...]
    tasks: Tuple[Task, ...]
    pc: PersonalizationCode
    behaviour_sequence: Tuple[str, ...]
    user_id: str
    user_features: Tuple[str, ...] = ()

    def __post_init__(self):
        by_name = {f.name: f for f in self.features}
        if len(by_name) != len(self.features):
            raise ValueError(f"feature set {self.name!r}: duplicate feature names")
        for task in self.tasks:
            if task.label not in by_name or by_name[task.label].kind is not Kind.LABEL:
                raise ValueError(f"feature set {self.name!r}: task {task.name!r} reads {task.label!r}, "
                                 "which is not a LABEL feature")
        if self.pc.source not in by_name or by_name[self.pc.source].kind is not Kind.PERSONALIZATION:
            raise ValueError(f"feature set {self.name!r}: PC source {self.pc.source!r} is not a "
                             "PERSONALIZATION feature")
        behaviour = [by_name.get(name) for name in self.behaviour_sequence]
        if not behaviour or any(f is None or f.kind is not Kind.SEQUENCE for f in behaviour):
            raise ValueError(f"feature set {self.name!r}: behaviour sequence {self.behaviour_sequence} must "
                             "name SEQUENCE features")
        if len({f.max_length for f in behaviour}) != 1:
            raise ValueError(f"feature set {self.name!r}: behaviour sequences {self.behaviour_sequence} "
                             "must share one max_length")
        if self.user_id not in by_name:
            raise ValueError(f"feature set {self.name!r}: user id feature {self.user_id!r} is not declared")
        for name in self.user_features:
            if (name not in by_name or by_name[name].kind not in (Kind.CATEGORICAL, Kind.SEQUENCE)
                    or name == self.user_id):
                raise ValueError(f"feature set {self.name!r}: user feature {name!r} is not a declared "
                                 "CATEGORICAL or SEQUENCE feature other than the user id")
        object.__setattr__(self, "_by_name", by_name)

    def feature(self, name: str) -> Feature:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown feature {name!r} in feature set {self.name!r}; "
                           f"known: {sorted(self._by_name)}") from None

    def has(self, name: str) -> bool:
        return name in self._by_name

    def features_of_kind(self, *kinds: Kind) -> Tuple[Feature, ...]:
        return tuple(f for f in self.features if f.kind in kinds)

    def model_input_features(self) -> Tuple[Feature, ...]:
        """Raw features a serving request must carry (no labels, no slice keys)."""
        return self.features_of_kind(Kind.CATEGORICAL, Kind.NUMERIC, Kind.SEQUENCE, Kind.PERSONALIZATION)

    def pc_bucket(self, value: int) -> int:
        """The bucket index tft.apply_buckets gives `value` (see the module's `pc_bucket`)."""
        return pc_bucket(value, self.pc.boundaries)


# ---------------------------------------------------------------------------
# Raw input schemas (KuaiRand), as published. Readers accept exactly these.
# ---------------------------------------------------------------------------
USER_ID, VIDEO_ID, DATE, HOURMIN, TIME_MS, TAB = "user_id", "video_id", "date", "hourmin", "time_ms", "tab"
PLAY_TIME_MS, DURATION_MS = "play_time_ms", "duration_ms"
LOG_COLUMNS: Tuple[str, ...] = (
    USER_ID, VIDEO_ID, DATE, HOURMIN, TIME_MS, "is_click", "is_like", "is_follow",
    "is_comment", "is_forward", "is_hate", "long_view", PLAY_TIME_MS, DURATION_MS,
    "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand", TAB,
)
# Every log column is an integer in KuaiRand's published files.
LOG_INT_COLUMNS: Tuple[str, ...] = LOG_COLUMNS

USER_ACTIVE_DEGREE = "user_active_degree"
USER_TABLE_COLUMNS: Tuple[str, ...] = (
    USER_ID, USER_ACTIVE_DEGREE, "is_lowactive_period", "is_live_streamer", "is_video_author",
    "follow_user_num", "follow_user_num_range", "fans_user_num", "fans_user_num_range",
    "friend_user_num", "friend_user_num_range", "register_days", "register_days_range",
) + tuple(f"onehot_feat{i}" for i in range(18))

AUTHOR_ID, MUSIC_ID, UPLOAD_DT, VIDEO_DURATION, TAG = "author_id", "music_id", "upload_dt", "video_duration", "tag"
VIDEO_TABLE_COLUMNS: Tuple[str, ...] = (
    VIDEO_ID, AUTHOR_ID, "video_type", UPLOAD_DT, "upload_type", "visible_status", VIDEO_DURATION,
    "server_width", "server_height", MUSIC_ID, "music_type", TAG,
)
MISSING_VALUE = -124  # KuaiRand's marker for a missing value

# ---------------------------------------------------------------------------
# Definitions
# ---------------------------------------------------------------------------
NEW_USER_HOURS = 24      # a user is new within this many hours of their first impression
# KuaiRand's `date`, `hourmin` and `upload_dt` are Kuaishou's local time (Beijing, UTC+8, no
# daylight saving): a log day runs from 00:00 to 24:00 there, and so does every day here.
LOG_TIMEZONE = datetime.timezone(datetime.timedelta(hours=8), "UTC+08:00")
NEW_ITEM_DAYS = 7        # an item is new within this many days of its upload
HISTORY_LENGTH = 30      # behaviour-sequence length (the paper's Sec. 3)
PADDING_INDEX = 0
INACTIVE_DEGREES: Tuple[str, ...] = ("low_active", "single_low_active", "middle_active")
USER_GROUPS: Tuple[str, ...] = ("new", "regular", "inactive")

# Columns the Beam step derives.
AVC, IS_NEW_USER, ITEM_AGE_DAYS = "avc", "is_new_user", "item_age_days"
HIST_VIDEO_IDS, HIST_TAGS, VIDEO_TAGS, HOUR = "hist_video_ids", "hist_tags", "video_tags", "hour"
USER_GROUP, AVC_BUCKET = "user_group", "avc_bucket"
# Transformed-feature name of the bucketized personalization code.
PC_BUCKET = "pc_bucket"
# Raw-tensor serving requests pad variable-length lists with this value.
SEQUENCE_PADDING_VALUE = -1
# The name the ranking model is served under (requests' model_spec.name, the base directory's
# name): part of the serving contract, so the client needs nothing from the pipeline.
SERVING_MODEL_NAME = "poso_ranking"

_DEGREES = ("full_active", "high_active", "middle_active", "low_active", "single_low_active",
            "2_14_day_new", "30day_retention", "day_new", "UNKNOWN")

FEATURES: Tuple[Feature, ...] = (
    # Ids.
    Feature(USER_ID, Dtype.INT64, Kind.CATEGORICAL, hash_buckets=100_000, embedding_dim=16),
    Feature(VIDEO_ID, Dtype.INT64, Kind.CATEGORICAL, hash_buckets=50_000, embedding_dim=16),
    Feature(AUTHOR_ID, Dtype.INT64, Kind.CATEGORICAL, hash_buckets=50_000, embedding_dim=8, default=-1),
    Feature(MUSIC_ID, Dtype.INT64, Kind.CATEGORICAL, hash_buckets=20_000, embedding_dim=8, default=-1),
    Feature(TAB, Dtype.INT64, Kind.CATEGORICAL, vocabulary=tuple(str(i) for i in range(15)), embedding_dim=4),
    Feature(HOUR, Dtype.INT64, Kind.CATEGORICAL, vocabulary=tuple(str(i) for i in range(24)), embedding_dim=4),
    # User profile (KuaiRand user_features_pure.csv).
    Feature(USER_ACTIVE_DEGREE, Dtype.STRING, Kind.CATEGORICAL, vocabulary=_DEGREES, embedding_dim=4, default="UNKNOWN"),
    Feature("is_video_author", Dtype.INT64, Kind.CATEGORICAL, vocabulary=("0", "1"), embedding_dim=2, default=0),
    Feature("follow_user_num_range", Dtype.STRING, Kind.CATEGORICAL, embedding_dim=4, default="0",
            vocabulary=("0", "(0,10]", "(10,50]", "(50,100]", "(100,150]", "(150,250]", "(250,500]", "500+")),
    Feature("fans_user_num_range", Dtype.STRING, Kind.CATEGORICAL, embedding_dim=4, default="0",
            vocabulary=("0", "[1,10)", "[10,100)", "[100,1k)", "[1k,5k)", "[5k,1w)", "[1w,10w)", "[10w,100w)", "[100w,1000w)")),
    Feature("register_days_range", Dtype.STRING, Kind.CATEGORICAL, embedding_dim=4, default="UNKNOWN",
            vocabulary=("8-14", "15-30", "31-60", "61-90", "91-180", "181-365", "366-730", "730+")),
    # Video (KuaiRand video_features_basic_pure.csv).
    Feature("video_type", Dtype.STRING, Kind.CATEGORICAL, vocabulary=("NORMAL", "AD"), embedding_dim=2, default="UNKNOWN"),
    Feature("upload_type", Dtype.STRING, Kind.CATEGORICAL, embedding_dim=4, default="UNKNOWN",
            vocabulary=("LongImport", "Web", "ShortImport", "Kmovie", "LongPicture", "PictureSet", "LongCamera",
                        "ShortCamera", "ShareFromOtherApp", "FollowShoot", "AiCutVideo", "PhotoCopy", "LipsSync")),
    Feature(VIDEO_DURATION, Dtype.FLOAT32, Kind.NUMERIC, default=0.0, description="video length in ms"),
    Feature(ITEM_AGE_DAYS, Dtype.FLOAT32, Kind.NUMERIC, default=0.0, description="days since upload"),
    # Behaviour sequences, most recent first; nothing from this or later impressions.
    Feature(VIDEO_TAGS, Dtype.INT64, Kind.SEQUENCE, hash_buckets=1_000, max_length=4, embedding_dim=8,
            description="the candidate video's tags"),
    Feature(HIST_VIDEO_IDS, Dtype.INT64, Kind.SEQUENCE, hash_buckets=50_000, max_length=HISTORY_LENGTH, embedding_dim=16,
            description="the user's last videos before this impression"),
    Feature(HIST_TAGS, Dtype.INT64, Kind.SEQUENCE, hash_buckets=1_000, max_length=HISTORY_LENGTH, embedding_dim=8,
            description="tags of the user's last videos before this impression"),
    # Personalization-code sources.
    Feature(AVC, Dtype.INT64, Kind.PERSONALIZATION, default=0,
            description="Accumulated View Count: the user's impressions before this one since first appearance"),
    Feature(IS_NEW_USER, Dtype.INT64, Kind.PERSONALIZATION, default=0,
            description=f"1 within {NEW_USER_HOURS} h of the user's first impression"),
    # Labels.
    Feature("long_view", Dtype.INT64, Kind.LABEL, default=0),
    Feature("is_like", Dtype.INT64, Kind.LABEL, default=0),
    Feature("is_follow", Dtype.INT64, Kind.LABEL, default=0),
    Feature("is_click", Dtype.INT64, Kind.LABEL, default=0),
    # Evaluation slices.
    Feature(USER_GROUP, Dtype.STRING, Kind.SLICE, vocabulary=USER_GROUPS, default="regular"),
    Feature(AVC_BUCKET, Dtype.INT64, Kind.SLICE, default=0),
)

TASKS: Tuple[Task, ...] = (
    Task("long_view", "long_view", 1.0, primary=True),
    Task("like", "is_like", 1.0, primary=True),
    Task("follow", "is_follow", 1.0),
    Task("click", "is_click", 1.0),
)

# Log2 buckets: AVC grows fast for active users, and the paper's gates separate
# the first few dozen impressions most.
PC = PersonalizationCode(source=AVC, boundaries=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))

KUAIRAND = FeatureSet("kuairand", FEATURES, TASKS, PC, behaviour_sequence=(HIST_VIDEO_IDS, HIST_TAGS),
                      user_id=USER_ID,
                      user_features=(USER_ACTIVE_DEGREE, "is_video_author", "follow_user_num_range",
                                     "fans_user_num_range", "register_days_range"))


def feature(name: str) -> Feature:
    return KUAIRAND.feature(name)


def features_of_kind(*kinds: Kind) -> Tuple[Feature, ...]:
    return KUAIRAND.features_of_kind(*kinds)


def model_input_features() -> Tuple[Feature, ...]:
    """Raw features a serving request must carry (no labels, no slice keys)."""
    return KUAIRAND.model_input_features()


serving_features = model_input_features


def raw_example_features() -> Tuple[Feature, ...]:
    """Every feature of the tf.Examples the Beam step writes."""
    return FEATURES


def day_start_ms(date: datetime.date) -> int:
    """Epoch milliseconds of 00:00 on `date` in LOG_TIMEZONE: where a log day begins."""
    return int(datetime.datetime(date.year, date.month, date.day, tzinfo=LOG_TIMEZONE).timestamp() * 1000)


def pc_bucket(value: int, boundaries: Sequence[int] = PC.boundaries) -> int:
    """The bucket index tft.apply_buckets gives `value`: the count of boundaries <= value."""
    return bisect.bisect_right(boundaries, value)


def user_group(is_new_user: int, active_degree: str) -> str:
    if is_new_user:
        return "new"
    if active_degree in INACTIVE_DEGREES:
        return "inactive"
    return "regular"
