"""The MovieLens feature set: the POSO paper's public-data protocol (its Table 5).

One example per rating. The model sees the candidate movie (id, genres), the user's
history strictly before the rating (movie ids and applied tags, most recent first, at
most `HISTORY_LENGTH`) and the personalization code AVC, the number of ratings the user
made before this one. Tasks: Favorite (rating = 5) and Satisfied (rating >= 4).

The user id is a model input (hashed, embedded) as in the KuaiRand model, and GAUC's group
key. The protocol tests on users unseen in training, so every test user's id embedding is
untrained: exactly the cold id that Meta-Embedding and MWUF (models.cold_start) replace or warm.
Every variant reads it alike. MovieLens has no user profile (ml-latest-small ships no users
file), so the user features those methods read are the user's history: the rated movies and
the applied tags before this rating, mean-pooled (empty at the first rating).

Like `specs`, this module imports only the standard library.
"""

from __future__ import annotations

from typing import Tuple

from feature_specs.specs import (HISTORY_LENGTH, Dtype, Feature, FeatureSet, Kind, PersonalizationCode,
                                 Task)

__all__ = ["MOVIELENS", "RATINGS_MEMBER", "TAGS_MEMBER", "MOVIES_MEMBER", "RATINGS_COLUMNS", "TAGS_COLUMNS",
           "MOVIES_COLUMNS", "DAT_RATINGS_MEMBER", "DAT_TAGS_MEMBER", "DAT_MOVIES_MEMBER", "DAT_SEPARATOR",
           "ML100K_RATINGS_MEMBER", "ML100K_MOVIES_MEMBER", "ML100K_GENRE_FLAGS", "ML100K_MOVIE_FIELDS",
           "GENRES", "GENRE_ALIASES", "GENRE_OOV_ID", "genre_id", "USER_ID", "MOVIE_ID", "MOVIE_GENRES", "HIST_MOVIE_IDS", "HIST_TAGS",
           "AVC", "FAVORITE", "SATISFIED", "FAVORITE_MIN_RATING", "SATISFIED_MIN_RATING"]

# ---------------------------------------------------------------------------
# Raw files, as GroupLens publishes them. Every layout has ratings and movies with the same
# columns (RATINGS_COLUMNS, MOVIES_COLUMNS; genres "|"-joined), some also tags (TAGS_COLUMNS).
# ---------------------------------------------------------------------------
# ML-20M, ML-25M, ML-32M and ml-latest(-small): CSV with a header row, UTF-8.
RATINGS_MEMBER, TAGS_MEMBER, MOVIES_MEMBER = "ratings.csv", "tags.csv", "movies.csv"
RATINGS_COLUMNS: Tuple[str, ...] = ("userId", "movieId", "rating", "timestamp")
TAGS_COLUMNS: Tuple[str, ...] = ("userId", "movieId", "tag", "timestamp")
MOVIES_COLUMNS: Tuple[str, ...] = ("movieId", "title", "genres")
# ML-1M (no tags; Latin-1) and ML-10M: the same columns, "::"-separated, no header row.
DAT_RATINGS_MEMBER, DAT_TAGS_MEMBER, DAT_MOVIES_MEMBER = "ratings.dat", "tags.dat", "movies.dat"
DAT_SEPARATOR = "::"
# ML-100K (no tags; Latin-1): u.data is "user item rating timestamp", tab-separated; u.item is
# "|"-separated: id, title, release date, video release date, IMDb URL, then 0/1 genre flags.
ML100K_RATINGS_MEMBER, ML100K_MOVIES_MEMBER = "u.data", "u.item"
ML100K_GENRE_FLAGS: Tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
ML100K_MOVIE_FIELDS: Tuple[str, ...] = ("movieId", "title", "release_date", "video_release_date",
                                        "imdb_url") + ML100K_GENRE_FLAGS
# The genres GroupLens documents for ml-latest (README.txt); ML-20M spells "Children" the same way.
GENRES: Tuple[str, ...] = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western", "IMAX",
    "(no genres listed)",
)
# Older releases' names for the same genres (ML-100K, ML-1M).
GENRE_ALIASES = {"Children's": "Children", "unknown": "(no genres listed)"}
# Every other genre name (a newer release's, a typo) shares this id: the movie still reads.
GENRE_OOV_ID = len(GENRES) + 1


def genre_id(name: str) -> int:
    """1 + position in GENRES (through GENRE_ALIASES); GENRE_OOV_ID for any other name."""
    name = GENRE_ALIASES.get(name, name)
    return GENRES.index(name) + 1 if name in GENRES else GENRE_OOV_ID


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
            description="the candidate movie's genres: genre_id of each, distinct, in the file's order"),
    Feature(HIST_MOVIE_IDS, Dtype.INT64, Kind.SEQUENCE, hash_buckets=50_000, max_length=HISTORY_LENGTH,
            embedding_dim=16, description="the user's rated movies before this rating, most recent first"),
    Feature(HIST_TAGS, Dtype.INT64, Kind.SEQUENCE, hash_buckets=10_000, max_length=HISTORY_LENGTH,
            embedding_dim=8, description="the user's applied tags before this rating (CRC-32 of the "
                                         "lower-cased tag), most recent first"),
    Feature(AVC, Dtype.INT64, Kind.PERSONALIZATION, default=0,
            description="Accumulated View Count: the user's ratings strictly before this one"),
    Feature(FAVORITE, Dtype.INT64, Kind.LABEL, default=0, description=f"rating >= {FAVORITE_MIN_RATING}"),
    Feature(SATISFIED, Dtype.INT64, Kind.LABEL, default=0, description=f"rating >= {SATISFIED_MIN_RATING}"),
    # 200k buckets: ML-20M has 138k users, ML-32M 201k (hash collisions there share a row).
    Feature(USER_ID, Dtype.INT64, Kind.CATEGORICAL, hash_buckets=200_000, embedding_dim=16,
            description="the user (also GAUC's group key)"),
)

MOVIELENS = FeatureSet(
    "movielens",
    _FEATURES,
    tasks=(Task(FAVORITE, FAVORITE, primary=True), Task(SATISFIED, SATISFIED, primary=True)),
    # The same log2 buckets as KuaiRand: they separate the first few dozen ratings most.
    pc=PersonalizationCode(source=AVC, boundaries=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)),
    behaviour_sequence=(HIST_MOVIE_IDS, HIST_TAGS),
    user_id=USER_ID,
    user_features=(HIST_MOVIE_IDS, HIST_TAGS),
)
