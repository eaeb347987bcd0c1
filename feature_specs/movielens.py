"""The MovieLens feature set: the POSO paper's public-data protocol (its Table 5).

One example per rating. The model sees the candidate movie (id, genres), the user's
history strictly before the rating (movie ids and applied tags, most recent first, at
most `HISTORY_LENGTH`) and the personalization code AVC, the number of ratings the user
made before this one. Tasks: Favorite (rating = 5) and Satisfied (rating >= 4).

The user id is only GAUC's group key (a SLICE), not a model input: the protocol tests on
users unseen in training, whose id embeddings would be untrained noise.

Like `specs`, this module imports only the standard library.
"""

from __future__ import annotations

from typing import Tuple

from feature_specs.specs import (HISTORY_LENGTH, Dtype, Feature, FeatureSet, Kind, PersonalizationCode,
                                 Task)

__all__ = ["MOVIELENS", "RATINGS_MEMBER", "TAGS_MEMBER", "MOVIES_MEMBER", "RATINGS_COLUMNS", "TAGS_COLUMNS",
           "MOVIES_COLUMNS", "GENRES", "USER_ID", "MOVIE_ID", "MOVIE_GENRES", "HIST_MOVIE_IDS", "HIST_TAGS",
           "AVC", "FAVORITE", "SATISFIED", "FAVORITE_MIN_RATING", "SATISFIED_MIN_RATING"]

# ---------------------------------------------------------------------------
# Raw files, as GroupLens publishes them (ml-latest-small, ml-20m: same format).
# ---------------------------------------------------------------------------
RATINGS_MEMBER, TAGS_MEMBER, MOVIES_MEMBER = "ratings.csv", "tags.csv", "movies.csv"
RATINGS_COLUMNS: Tuple[str, ...] = ("userId", "movieId", "rating", "timestamp")
TAGS_COLUMNS: Tuple[str, ...] = ("userId", "movieId", "tag", "timestamp")
MOVIES_COLUMNS: Tuple[str, ...] = ("movieId", "title", "genres")
# The genres GroupLens documents (README.txt); ML-20M spells "Children" the same way.
GENRES: Tuple[str, ...] = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western", "IMAX",
    "(no genres listed)",
)

# Task definitions on the 0.5..5 star scale.
FAVORITE_MIN_RATING = 5.0
SATISFIED_MIN_RATING = 4.0

# ---------------------------------------------------------------------------
# Example features.
# ---------------------------------------------------------------------------
USER_ID, MOVIE_ID, MOVIE_GENRES = "user_id", "movie_id", "movie_genres"
HIST_MOVIE_IDS, HIST_TAGS, AVC = "hist_movie_ids", "hist_tags", "avc"
FAVORITE, SATISFIED = "favorite", "satisfied"

_FEATURES: Tuple[Feature, ...] = (
    Feature(MOVIE_ID, Dtype.INT64, Kind.CATEGORICAL, hash_buckets=50_000, embedding_dim=16),
    Feature(MOVIE_GENRES, Dtype.INT64, Kind.SEQUENCE, hash_buckets=1_000, max_length=len(GENRES), embedding_dim=8,
            description="the candidate movie's genres, as 1 + position in GENRES"),
    Feature(HIST_MOVIE_IDS, Dtype.INT64, Kind.SEQUENCE, hash_buckets=50_000, max_length=HISTORY_LENGTH,
            embedding_dim=16, description="the user's rated movies before this rating, most recent first"),
    Feature(HIST_TAGS, Dtype.INT64, Kind.SEQUENCE, hash_buckets=10_000, max_length=HISTORY_LENGTH,
            embedding_dim=8, description="the user's applied tags before this rating (CRC-32 of the "
                                         "lower-cased tag), most recent first"),
    Feature(AVC, Dtype.INT64, Kind.PERSONALIZATION, default=0,
            description="Accumulated View Count: the user's ratings strictly before this one"),
    Feature(FAVORITE, Dtype.INT64, Kind.LABEL, default=0, description=f"rating >= {FAVORITE_MIN_RATING}"),
    Feature(SATISFIED, Dtype.INT64, Kind.LABEL, default=0, description=f"rating >= {SATISFIED_MIN_RATING}"),
    Feature(USER_ID, Dtype.INT64, Kind.SLICE, description="GAUC's group key; not a model input"),
)

MOVIELENS = FeatureSet(
    "movielens",
    _FEATURES,
    tasks=(Task(FAVORITE, FAVORITE, primary=True), Task(SATISFIED, SATISFIED, primary=True)),
    # The same log2 buckets as KuaiRand: they separate the first few dozen ratings most.
    pc=PersonalizationCode(source=AVC, boundaries=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)),
    behaviour_sequence=(HIST_MOVIE_IDS, HIST_TAGS),
    user_id=USER_ID,
)
