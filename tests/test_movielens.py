"""MovieLens: examples equal a brute-force pandas computation; split by user; the MOVIELENS
feature set through tf.Transform, RankingModel, export and the paper benchmark's runner."""

import hashlib
import os
import zipfile
import zlib

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import tensorflow_transform as tft

from benchmarks import paper_movielens
from components import movielens as ml_data
from feature_specs import movielens as ml
from models import export, model, preprocessing, trainer

TINY = dict(embedding_dim=4, mlp_units=(16,), expert_units=(8,), tower_units=(4,), num_heads=2, head_dim=4,
            gate_hidden_units=4, num_experts=2, num_value_projections=2, learning_rate=0.01)
NUM_USERS = 12
ML_LATEST_SMALL = paper_movielens.default_data_zip()


def _fabricate(seed: int = 0):
    """Ratings with same-second ties, one user with > 30 ratings, tags at rating times."""
    rng = np.random.default_rng(seed)
    movies = pd.DataFrame({"movieId": np.arange(1, 81) * 7,
                           "title": [f"Movie {i}, The (19{i % 100:02d})" for i in range(80)],
                           "genres": ["|".join(rng.choice(ml.GENRES[:-1], size=rng.integers(1, 4), replace=False))
                                      for _ in range(80)]})
    movies.loc[3, "genres"] = "(no genres listed)"
    movies.loc[5, "title"] = "Amélie (2001)"  # Latin-1 in ML-100K and ML-1M, UTF-8 elsewhere
    ratings, tags = [], []
    for user in range(1, NUM_USERS + 1):
        count = 45 if user == 1 else int(rng.integers(3, 20))
        times = 1_000_000 + np.sort(rng.integers(0, 40, size=count)) * 60  # many ties
        for movie, time in zip(rng.choice(movies["movieId"], size=count, replace=False), times):
            ratings.append((user, int(movie), float(rng.choice(np.arange(1, 11) / 2)), int(time)))
        for _ in range(int(rng.integers(60, 70) if user == 1 else rng.integers(0, 6))):
            time = int(rng.choice(times)) if rng.random() < 0.5 else int(1_000_000 + rng.integers(0, 2400))
            tags.append((user, int(rng.choice(movies["movieId"])), str(rng.choice(["Funny", "funny ", "dark, slow",
                                                                                  "twist", "Oscar", "café"])), time))
    return (pd.DataFrame(ratings, columns=ml.RATINGS_COLUMNS), pd.DataFrame(tags, columns=ml.TAGS_COLUMNS), movies)


def _write_zip(path, ratings, tags, movies, folder="ml-test/", skip=(), rename=None):
    with zipfile.ZipFile(path, "w") as archive:
        for name, frame in ((ml.RATINGS_MEMBER, ratings), (ml.TAGS_MEMBER, tags), (ml.MOVIES_MEMBER, movies)):
            if name in skip:
                continue
            if rename and name in rename:
                frame = frame.rename(columns=rename[name])
            archive.writestr(folder + name, frame.to_csv(index=False, lineterminator="\r\n"))
    return str(path)


# Each release's own file layout (folder, members, separators, encodings, genre names).
RELEASES = {"ml-100k": "ml-100k/", "ml-1m": "ml-1m/", "ml-10m": "ml-10M100K/", "ml-25m": "ml-25m/"}


def _old_genre_names(genres, flags=False):
    """A movie's genres as ML-100K/ML-1M spell them ("Children's"; ML-100K has no IMAX)."""
    names = [{"Children": "Children's", "(no genres listed)": "unknown"}.get(g, g) for g in genres.split("|")]
    if not flags:
        return names
    return [g for g in ml.ML100K_GENRE_FLAGS if g in names] or ["unknown"]  # in flag order


def _write_layout(path, release, ratings, tags, movies, replace=None):
    """A zip in `release`'s layout holding these tables; `replace`: member name -> text instead."""
    folder = RELEASES[release]
    if release == "ml-25m":
        return _write_zip(path, ratings, tags, movies, folder=folder)
    rating_text = ratings["rating"].map(lambda r: f"{r:g}")
    if release == "ml-100k":
        members = {"u.data": "".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in zip(
            ratings["userId"], ratings["movieId"], rating_text, ratings["timestamp"])),
                   "u.item": "".join(
            f"{m}|{title}|01-Jan-1995||http://us.imdb.com/M/title-exact?{m}|"
            + "|".join("1" if g in _old_genre_names(genres, flags=True) else "0" for g in ml.ML100K_GENRE_FLAGS)
            + "\n" for m, title, genres in movies.itertuples(index=False)),
                   "u.user": "1|24|M|technician|85711\n", "u.genre": "unknown|0\nAction|1\n\n"}
        encoding = "latin-1"
    else:
        members = {"ratings.dat": "".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in zip(
            ratings["userId"], ratings["movieId"], rating_text, ratings["timestamp"])),
                   "movies.dat": "".join(f"{m}::{title}::{'|'.join(_old_genre_names(genres))}\n"
                                         for m, title, genres in movies.itertuples(index=False))}
        if release == "ml-10m":
            members["tags.dat"] = "".join(f"{u}::{m}::{tag}::{t}\n" for u, m, tag, t in tags.itertuples(index=False))
        else:
            members["users.dat"] = "1::F::1::10::48067\n"
        encoding = "utf-8" if release == "ml-10m" else "latin-1"
    members.update(replace or {})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(folder + "README", "fabricated")
        for name, text in members.items():
            archive.writestr(folder + name, text.encode(encoding))
    return str(path)


@pytest.fixture(scope="module")
def fabricated(tmp_path_factory):
    ratings, tags, movies = _fabricate()
    path = _write_zip(tmp_path_factory.mktemp("zip") / "ml-test.zip", ratings, tags, movies)
    return dict(path=path, ratings=ratings, tags=tags, movies=movies)


def _brute_force(ratings, tags, movies):
    """The protocol, one rating at a time, straight from its definition."""
    tags = tags.assign(tag_id=[zlib.crc32(t.strip().lower().encode()) for t in tags["tag"]])
    genre_ids = {m: list(dict.fromkeys(ml.genre_id(g) for g in text.split("|")))
                 for m, text in zip(movies["movieId"], movies["genres"])}
    rows = []
    for r in ratings.itertuples():
        earlier = ratings[(ratings.userId == r.userId) & (ratings.timestamp < r.timestamp)]
        earlier = earlier.sort_values(["timestamp", "movieId"], ascending=False)
        earlier_tags = tags[(tags.userId == r.userId) & (tags.timestamp < r.timestamp)]
        earlier_tags = earlier_tags.sort_values(["timestamp", "movieId", "tag_id"], ascending=False)
        rows.append({ml.USER_ID: r.userId, ml.MOVIE_ID: r.movieId, "timestamp": r.timestamp,
                     ml.AVC: len(earlier), ml.HIST_MOVIE_IDS: earlier["movieId"].head(30).tolist(),
                     ml.HIST_TAGS: earlier_tags["tag_id"].head(30).tolist(),
                     ml.MOVIE_GENRES: genre_ids[r.movieId],
                     ml.FAVORITE: int(r.rating == 5.0), ml.SATISFIED: int(r.rating >= 4.0)})
    return pd.DataFrame(rows)


def test_examples_equal_brute_force_and_use_only_earlier_history(fabricated):
    prepared = ml_data.prepare_ratings(ml_data.read_movielens(fabricated["path"]))
    got = ml_data.examples_frame(prepared)
    want = _brute_force(fabricated["ratings"], fabricated["tags"], fabricated["movies"])
    key = [ml.USER_ID, ml.MOVIE_ID, "timestamp"]
    merged = want.merge(got, on=key, suffixes=("_want", "_got"), validate="one_to_one")
    assert len(merged) == len(want) == len(got) == len(fabricated["ratings"])
    for name in (ml.AVC, ml.HIST_MOVIE_IDS, ml.HIST_TAGS, ml.MOVIE_GENRES, ml.FAVORITE, ml.SATISFIED):
        assert merged[f"{name}_want"].tolist() == merged[f"{name}_got"].tolist(), name
    # The fabricated data exercises truncation, ties and tags.
    assert got[ml.HIST_MOVIE_IDS].map(len).max() == 30 and got[ml.AVC].max() > 30
    assert got[ml.HIST_TAGS].map(len).max() == 30
    assert got.duplicated([ml.USER_ID, "timestamp"]).any()
    # No leakage: every history movie was rated strictly before the example.
    rated_at = {(u, m): t for u, m, t in fabricated["ratings"][["userId", "movieId", "timestamp"]].itertuples(index=False)}
    for row in got.itertuples():
        assert all(rated_at[(row.user_id, movie)] < row.timestamp for movie in row.hist_movie_ids)


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_every_release_layout_reads_end_to_end_to_examples(release, fabricated, tmp_path):
    ratings, tags, movies = fabricated["ratings"], fabricated["tags"], fabricated["movies"]
    path = _write_layout(tmp_path / f"{release}.zip", release, ratings, tags, movies)
    tables = ml_data.read_movielens(path)
    assert tables.layout == {"ml-100k": ml_data.ML100K, "ml-25m": ml_data.CSV}.get(release, ml_data.DAT)
    pd.testing.assert_frame_equal(tables.ratings.reset_index(drop=True), ratings, check_dtype=False)
    assert tables.movies.set_index("movieId")["title"].to_dict() == movies.set_index("movieId")["title"].to_dict()
    has_tags = release in ("ml-10m", "ml-25m")
    want_tags = tags if has_tags else tags.iloc[:0]
    assert tables.tags.reset_index(drop=True)[["userId", "movieId", "tag"]].values.tolist() == \
        want_tags[["userId", "movieId", "tag"]].values.tolist()
    if release != "ml-25m":  # as the release spells them; genre_id maps them back
        movies = movies.assign(genres=["|".join(_old_genre_names(g, flags=release == "ml-100k"))
                                       for g in movies["genres"]])
    # End to end: the written tf.Examples of both splits equal the protocol's brute force.
    ml_data.write_examples(path, str(tmp_path / "examples"), test_fraction=0.3, seed=0)
    records = [r for split in ml_data.SPLITS for r in tf.data.TFRecordDataset(
        tf.io.gfile.glob(str(tmp_path / "examples" / split / "*.tfrecord.gz")), compression_type="GZIP")]
    got = {}
    for record in records:
        features = tf.train.Example.FromString(record.numpy()).features.feature
        values = {name: list(features[name].int64_list.value) for name in features}
        got[(values[ml.USER_ID][0], values[ml.MOVIE_ID][0])] = values
    want = _brute_force(ratings, want_tags, movies)
    assert len(got) == len(want) == len(ratings)
    for row in want.itertuples():
        example = got[(row.user_id, row.movie_id)]
        for name in (ml.AVC, ml.FAVORITE, ml.SATISFIED):
            assert example[name] == [getattr(row, name)], (name, row)
        for name in (ml.HIST_MOVIE_IDS, ml.HIST_TAGS, ml.MOVIE_GENRES):
            assert example.get(name, []) == getattr(row, name), (name, row)
    assert any(example.get(ml.HIST_TAGS) for example in got.values()) == has_tags


def test_ml_latest_small_reads_as_before(tmp_path):
    """The real ml-latest-small: the examples' columns hash as they did before the other layouts
    were added (components/movielens.py at f31c43a)."""
    if not os.path.isfile(ML_LATEST_SMALL):
        pytest.skip(f"{ML_LATEST_SMALL} is not here: set POSO_MOVIELENS_ZIP")
    tables = ml_data.read_movielens(ML_LATEST_SMALL)
    assert (tables.layout, len(tables.ratings), len(tables.tags), len(tables.movies)) == ("csv", 100_836, 3_683, 9_742)
    prepared = ml_data.prepare_ratings(tables)
    columns = ml_data.example_columns(prepared, np.arange(len(prepared)))
    digest = hashlib.sha256()
    for name in sorted(columns):
        for array in columns[name]:
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    assert digest.hexdigest() == "e72d85f2d0dbfce1dd1a979c221984b7034a488f9814d2f42572189cb71d8a05"


def _read_split(path):
    spec = {ml.USER_ID: tf.io.FixedLenFeature([], tf.int64), ml.AVC: tf.io.FixedLenFeature([], tf.int64)}
    records = list(tf.data.TFRecordDataset(tf.io.gfile.glob(os.path.join(path, "*.tfrecord.gz")),
                                           compression_type="GZIP").as_numpy_iterator())
    return tf.io.parse_example(records, spec)[ml.USER_ID].numpy()


def test_split_is_by_user_deterministic_and_seedable(fabricated, tmp_path):
    summary = ml_data.write_examples(fabricated["path"], str(tmp_path / "a"), test_fraction=0.3, seed=1)
    train, test = (_read_split(str(tmp_path / "a" / split)) for split in ml_data.SPLITS)
    assert train.size + test.size == len(fabricated["ratings"])
    assert not set(train) & set(test)
    assert set(train) | set(test) == set(range(1, NUM_USERS + 1))
    assert (summary["test"]["examples"], summary["test"]["users"]) == (test.size, len(set(test)))
    # The validation split draws its users from the training users and leaves the test users out.
    ml_data.write_examples(fabricated["path"], str(tmp_path / "v"), test_fraction=0.3, seed=1, validation=True)
    fit, validation = (_read_split(str(tmp_path / "v" / split)) for split in ml_data.SPLITS)
    assert set(fit) | set(validation) == set(train) and not set(fit) & set(validation) and validation.size
    users = np.arange(1, 100_001)
    mask = ml_data.test_user_mask(users, 0.3, seed=1)
    assert abs(mask.mean() - 0.3) < 0.01
    np.testing.assert_array_equal(mask, ml_data.test_user_mask(users, 0.3, seed=1))
    assert (mask != ml_data.test_user_mask(users, 0.3, seed=2)).mean() > 0.3
    np.testing.assert_array_equal(np.isin(test, users[mask]), True)


def test_bad_zips_get_errors_naming_the_file(fabricated, tmp_path):
    ratings, tags, movies = fabricated["ratings"], fabricated["tags"], fabricated["movies"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ml_data.read_movielens(str(tmp_path / "nope.zip"))
    (tmp_path / "text.zip").write_text("not a zip")
    with pytest.raises(ValueError, match="text.zip: not a zip file"):
        ml_data.read_movielens(str(tmp_path / "text.zip"))
    path = _write_zip(tmp_path / "no_tags.zip", ratings, tags, movies, skip=(ml.TAGS_MEMBER,))
    with pytest.raises(FileNotFoundError, match=r"no_tags.zip: expected exactly one member 'tags.csv'"):
        ml_data.read_movielens(path)
    path = _write_zip(tmp_path / "columns.zip", ratings, tags, movies, rename={ml.RATINGS_MEMBER: {"rating": "stars"}})
    with pytest.raises(ValueError, match=r"columns.zip:ml-test/ratings.csv: expected columns .*'rating'.*got"):
        ml_data.read_movielens(path)
    path = _write_zip(tmp_path / "stars.zip", ratings.assign(rating=ratings["rating"].mask(ratings.index == 4, 7.0)),
                      tags, movies)
    with pytest.raises(ValueError, match=r"stars.zip:ml-test/ratings.csv: rating 7.0 in data row 5"):
        ml_data.read_movielens(path)
    path = _write_zip(tmp_path / "text_id.zip", ratings.astype({"userId": str}).assign(
        userId=lambda f: f["userId"].mask(f.index == 2, "x")), tags, movies)
    with pytest.raises(ValueError, match=r"text_id.zip:ml-test/ratings.csv: cannot parse"):
        ml_data.read_movielens(path)
    path = _write_zip(tmp_path / "readme.zip", ratings, tags, movies, skip=(ml.RATINGS_MEMBER,))
    with pytest.raises(ValueError, match=r"readme.zip: is not a MovieLens release; expected one of: ML-20M.*"
                                         r"it has: ml-test/movies.csv, ml-test/tags.csv"):
        ml_data.read_movielens(path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("ml-test/ratings.csv", ratings.to_csv(index=False))
        archive.writestr("ml-test/ratings.dat", "1::7::5::1000000\n")
    with pytest.raises(ValueError, match=r"readme.zip: has the files of several layouts"):
        ml_data.read_movielens(path)
    path = _write_layout(tmp_path / "fields.zip", "ml-10m", ratings, tags, movies)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("ml-10M100K-copy/ratings.dat", "1::7::5::1000000\n")
    with pytest.raises(FileNotFoundError, match=r"expected exactly one member 'ratings.dat'.*several"):
        ml_data.read_movielens(path)
    path = _write_layout(tmp_path / "fields.zip", "ml-1m", ratings, tags, movies,
                         replace={"ratings.dat": "1::7::5\n2::7::4\n"})
    with pytest.raises(ValueError, match=r"fields.zip:ml-1m/ratings.dat: expected 4 fields per line "
                                         r"\(userId, movieId, rating, timestamp\), got 3"):
        ml_data.read_movielens(path)
    path = _write_layout(tmp_path / "flags.zip", "ml-100k", ratings, tags, movies,
                         replace={"u.item": "7|Movie|01-Jan-1995||http://x|0|2" + "|0" * 17 + "\n"})
    with pytest.raises(ValueError, match=r"flags.zip:ml-100k/u.item: genre flag 'Action' is 2 in data row 1"):
        ml_data.read_movielens(path)


def test_unknown_genres_share_the_out_of_vocabulary_id(fabricated, tmp_path):
    movies, movie = fabricated["movies"].copy(), fabricated["ratings"]["movieId"].iat[0]
    movies.loc[movies["movieId"] == movie, "genres"] = "Action|Space opera|Children's|Cyberpunk"
    path = _write_zip(tmp_path / "genre.zip", fabricated["ratings"], fabricated["tags"], movies)
    prepared = ml_data.prepare_ratings(ml_data.read_movielens(path))
    genres = ml_data.examples_frame(prepared).set_index(ml.MOVIE_ID)[ml.MOVIE_GENRES]
    want = (ml.GENRES.index("Action") + 1, ml.GENRE_OOV_ID, ml.GENRES.index("Children") + 1)
    assert genres.loc[[movie]].map(tuple).unique().tolist() == [want]
    assert ml.GENRE_OOV_ID not in {ml.genre_id(g) for g in ml.GENRES + tuple(ml.GENRE_ALIASES)}


@pytest.fixture(scope="module")
def transformed(fabricated, tmp_path_factory):
    root = tmp_path_factory.mktemp("movielens")
    ml_data.write_examples(fabricated["path"], str(root / "examples"), test_fraction=0.3, seed=0)
    train, test = (str(root / "examples" / split / "*.tfrecord.gz") for split in ml_data.SPLITS)
    transform_dir = paper_movielens.analyze(train, str(root / "transform"), str(root / "tft_tmp"))
    return dict(root=root, train=train, test=test, transform_dir=transform_dir)


def test_poso_model_trains_exports_and_serves_the_same(transformed):
    serving_dir = str(transformed["root"] / "model")
    result = trainer.train_and_export(transformed["train"], transformed["test"], transformed["transform_dir"],
                                      serving_dir, model.make_config("poso_all", feature_set=ml.MOVIELENS, **TINY),
                                      batch_size=32, train_steps=4, eval_steps=1, verbose=0,
                                      feature_set=ml.MOVIELENS)
    assert all(np.isfinite(v).all() for v in result.history.values())
    serialized, _ = paper_movielens.read_test_examples(transformed["test"])
    loaded = tf.saved_model.load(serving_dir)
    served = loaded.signatures[export.SERVING_DEFAULT](examples=tf.constant(serialized))
    tft_output = tft.TFTransformOutput(transformed["transform_dir"])
    raw = tf.io.parse_example(tf.constant(serialized), preprocessing.raw_feature_spec(feature_set=ml.MOVIELENS))
    features = tft_output.transform_features_layer()(raw)
    assert features["pc_bucket"].numpy().max() > 0
    eager = result.model(features)
    assert set(served) == {task.name for task in ml.MOVIELENS.tasks} == set(eager)
    for name in eager:
        np.testing.assert_allclose(served[name].numpy(), eager[name].numpy(), rtol=1e-5, atol=1e-6)
    # serving_raw: sequences as padded int64 matrices.
    raw_tensors = {name: tf.sparse.to_dense(value, default_value=-1) if isinstance(value, tf.SparseTensor) else value
                   for name, value in raw.items() if name in export.raw_input_signature(ml.MOVIELENS)}
    from_raw = loaded.signatures[export.SERVING_RAW](**raw_tensors)
    for name in eager:
        np.testing.assert_allclose(from_raw[name].numpy(), eager[name].numpy(), rtol=1e-5, atol=1e-6)
    gates = loaded.signatures[export.GATES](examples=tf.constant(serialized[:5]))
    assert export.PC_OUTPUT in gates
    assert {name.split("_")[0] for name in gates if name != export.PC_OUTPUT} == {"mlp", "attention", "mmoe"}


def test_run_movielens_gives_one_row_per_variant_seed_and_task(fabricated, tmp_path):
    results = paper_movielens.run_movielens(fabricated["path"], seeds=[0, 1], variants=["baseline", "poso_mlp"],
                                            work_dir=str(tmp_path), epochs=1, batch_size=64, test_fraction=0.3,
                                            overrides=TINY, verbose=-1)
    assert len(results) == 2 * 2 * 2
    assert set(results["task"]) == {ml.FAVORITE, ml.SATISFIED}
    assert results["gauc"].between(0, 1).all()
    table = paper_movielens.format_table(results)
    assert "POSO(MLP)" in table and "Baseline" in table and "± " in table
    with pytest.raises(ValueError, match="unknown budget key"):
        paper_movielens.run_movielens(fabricated["path"], [0], ["baseline"], str(tmp_path), epoch=1)
    with pytest.raises(ValueError, match="jobs=0"):
        paper_movielens.run_movielens(fabricated["path"], [0], ["baseline"], str(tmp_path), jobs=0)
    # Two at a time, each in a worker process: the same rows, up to the float order of one thread.
    in_workers = paper_movielens.run_movielens(fabricated["path"], seeds=[0, 1], variants=["baseline", "poso_mlp"],
                                               work_dir=str(tmp_path / "jobs"), epochs=1, batch_size=64,
                                               test_fraction=0.3, overrides=TINY, verbose=-1, jobs=2)
    columns = ["variant", "seed", "task", "gauc", "gauc_avc_lt_32", "test_examples"]
    pd.testing.assert_frame_equal(in_workers[columns], results[columns], atol=1e-3)
