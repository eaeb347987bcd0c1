"""MeLU's training and evaluation loop for the offline benchmarks (Lee et al., KDD 2019, arXiv 1908.00413).

BENCHMARK-ONLY (see models.melu): a MeLU model adapts its decision layers (the task towers) to
each user by gradient steps on that user's support set before scoring, which TF Serving cannot
do, so MeLU is trained and scored here, in memory, and never exported.

Episodes (training). Each user's examples, in time order (the AVC, ties by position): the
first `support_size` are the support set (MeLU's support set is the user's earliest
interactions), the others the query pool; users with fewer than support_size + 1 examples do
not train. A step draws `batch_size // (support_size + query_size)` users, their support sets and
`query_size` query examples each (drawn from the pool with replacement), adapts the towers per
user (`models.melu.adapt`, k = `local_steps` steps of `local_learning_rate`) and applies Adam to
the gradient of the query loss (every variable: the global embeddings and layers, and the
towers' initial weights theta). So a step reads `batch_size` examples, as the other rows' steps.

Evaluation ("adapt on the support set, score the rest"). A user's first `support_size` examples
of the evaluated data (in time order) are the support set; every later one is scored with the
towers adapted on it. The support examples themselves are scored with the unadapted towers
(nothing of the user is known before them), so that every example has a score. GAUC compares
examples within a user, and a user's support and later examples are then scored by two
differently calibrated towers: an all-examples GAUC is biased against MeLU (on ml-latest-small,
seed 0, 1 epoch: 1.1 pp of Favorite GAUC below the unadapted towers on every example, while the
ratings after the support set were ranked alike). MeLU's own protocol is the GAUC over the
examples after each user's support set (`after_support`), which the tables report for every
row. Scoring each support example progressively (adapted on the ones before it) is worse: a
positive raises the user's later scores but never its own, and on users with few examples
(the synthetic evaluation day) that ranked below chance.

Settings are our reading, not tuned (no validation run picked them): support and query sets of
8 (AVC 8 is where the project's log2 PC buckets end "cold", see MWUF's default), k = 2 local
steps (the paper reports MeLU-1 and MeLU-5) of 0.05 (plain SGD), second-order meta-gradient.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["MeLUSettings", "Episodes", "make_trainer", "train", "predict", "after_support", "load_examples",
           "main"]


@dataclasses.dataclass(frozen=True)
class MeLUSettings:
    support_size: int = 8
    query_size: int = 8
    local_steps: int = 2
    local_learning_rate: float = 0.05
    first_order: bool = False

    def __post_init__(self):
        for name in ("support_size", "query_size", "local_steps"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"MeLUSettings.{name}={getattr(self, name)!r}: expected an int >= 1")
        if not self.local_learning_rate > 0:
            raise ValueError(f"MeLUSettings.local_learning_rate={self.local_learning_rate!r}: expected > 0")


def _time_ranks(user_ids: np.ndarray, order: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(indices sorted by user then time, each example's 0-based position in its user's timeline)."""
    sorted_index = np.lexsort((np.arange(user_ids.size), order, user_ids))
    sorted_users = user_ids[sorted_index]
    starts = np.r_[0, np.flatnonzero(sorted_users[1:] != sorted_users[:-1]) + 1]
    counts = np.diff(np.r_[starts, sorted_users.size])
    ranks = np.empty(user_ids.size, np.int64)
    ranks[sorted_index] = np.arange(user_ids.size) - np.repeat(starts, counts)
    return sorted_index, ranks


def after_support(user_ids: np.ndarray, order: np.ndarray, support_size: int = MeLUSettings().support_size
                  ) -> np.ndarray:
    """[N] bool: the example comes after its user's first `support_size` (MeLU's query examples at
    evaluation; the same examples for every row of a table)."""
    return _time_ranks(np.asarray(user_ids), np.asarray(order))[1] >= support_size


class Episodes:
    """Support and query index arrays of the training users (see the module docstring)."""

    def __init__(self, user_ids: np.ndarray, order: np.ndarray, settings: MeLUSettings):
        sorted_index, ranks = _time_ranks(np.asarray(user_ids), np.asarray(order))
        ranks_sorted = ranks[sorted_index]
        starts = np.flatnonzero(ranks_sorted == 0)
        counts = np.diff(np.r_[starts, sorted_index.size])
        eligible = counts > settings.support_size
        if not eligible.any():
            raise ValueError(f"MeLU: no training user has more than support_size={settings.support_size} examples")
        self.settings = settings
        starts, counts = starts[eligible], counts[eligible]
        self.sorted_index = sorted_index
        self.support = sorted_index[starts[:, None] + np.arange(settings.support_size)]  # [users, S]
        self.pool_start = starts + settings.support_size
        self.pool_size = counts - settings.support_size

    @property
    def num_users(self) -> int:
        return int(self.support.shape[0])

    def batches(self, users_per_step: int, seed: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Forever: (example indices [U * (S + Q)], local user index of each): supports, then queries."""
        rng = np.random.default_rng(seed)
        settings = self.settings
        local = np.r_[np.repeat(np.arange(users_per_step), settings.support_size),
                      np.repeat(np.arange(users_per_step), settings.query_size)].astype(np.int32)
        while True:
            users = rng.choice(self.num_users, users_per_step, replace=users_per_step > self.num_users)
            offsets = (rng.random((users_per_step, settings.query_size)) * self.pool_size[users, None]).astype(np.int64)
            query = self.sorted_index[self.pool_start[users, None] + offsets]
            yield np.r_[self.support[users].ravel(), query.ravel()], local


def _labels(feature_set, batch) -> List:
    return [batch[task.label] for task in feature_set.tasks]


def make_trainer(config, feature_set, features: Mapping[str, np.ndarray], user_ids: np.ndarray, order: np.ndarray,
                 batch_size: int, seed: int, settings: MeLUSettings = MeLUSettings()):
    """(a `RankingModel` of `config`, the backbone: the baseline's; run(steps) -> last query loss):
    MeLU meta-training in steps of `batch_size` examples on in-memory transformed `features`;
    `user_ids` and `order` (e.g. AVC) per example define the users' timelines."""
    import tensorflow as tf

    from models import melu, model as model_lib
    from models.optimizers import FusedAdam

    episode_size = settings.support_size + settings.query_size
    users_per_step = batch_size // episode_size
    if users_per_step < 1:
        raise ValueError(f"MeLU: batch_size {batch_size} is smaller than one episode "
                         f"(support {settings.support_size} + query {settings.query_size})")
    tf.keras.utils.set_random_seed(seed)
    episodes = Episodes(user_ids, order, settings)
    ranking = model_lib.RankingModel(config, feature_set)
    ranking({name: tf.constant(value[:2]) for name, value in features.items()})  # builds every layer
    towers = [ranking.towers[task.name] for task in feature_set.tasks]
    loss_weights = [task.loss_weight for task in feature_set.tasks]
    optimizer = FusedAdam(learning_rate=config.learning_rate)
    support_examples = users_per_step * settings.support_size

    @tf.function(reduce_retracing=True)
    def step(batch, local_user):
        with tf.GradientTape() as tape:
            per_task = ranking.tower_inputs(batch)
            labels = _labels(feature_set, batch)
            adapted = melu.adapt(melu.tower_weights(towers), [h[:support_examples] for h in per_task],
                                 [y[:support_examples] for y in labels], local_user[:support_examples],
                                 users_per_step, settings.local_steps, settings.local_learning_rate, loss_weights,
                                 first_order=settings.first_order)
            logits = melu.tower_logits(adapted, [h[support_examples:] for h in per_task],
                                       local_user[support_examples:])
            loss = tf.reduce_mean(melu.per_example_loss(logits, [y[support_examples:] for y in labels], loss_weights))
        variables = ranking.trainable_variables
        gradients = tape.gradient(loss, variables)
        optimizer.apply_gradients([(g, v) for g, v in zip(gradients, variables) if g is not None])
        return loss

    batches = episodes.batches(users_per_step, seed)

    def run(steps: int) -> float:
        loss = float("nan")
        for _ in range(steps):
            index, local_user = next(batches)
            loss = step({name: tf.constant(value[index]) for name, value in features.items()}, tf.constant(local_user))
        return float(loss)

    return ranking, run


def train(config, feature_set, features: Mapping[str, np.ndarray], user_ids: np.ndarray, order: np.ndarray,
          steps: int, batch_size: int, seed: int, settings: MeLUSettings = MeLUSettings()):
    """A `RankingModel` meta-trained with MeLU for `steps` steps (see `make_trainer`)."""
    ranking, run = make_trainer(config, feature_set, features, user_ids, order, batch_size, seed, settings)
    run(steps)
    return ranking


def predict(ranking, feature_set, features: Mapping[str, np.ndarray], user_ids: np.ndarray, order: np.ndarray,
            settings: MeLUSettings = MeLUSettings(), batch_size: int = 4096, users_per_chunk: int = 256
            ) -> Dict[str, np.ndarray]:
    """{task: probability [N]}: each user's first support_size examples (in time order) scored by
    the unadapted model, the later ones by the towers adapted on those (module docstring)."""
    import tensorflow as tf

    from models import melu

    size = int(np.asarray(user_ids).size)
    outputs = {task.name: np.empty(size, np.float32) for task in feature_set.tasks}
    for start in range(0, size, batch_size):
        batch = {name: tf.constant(value[start:start + batch_size]) for name, value in features.items()}
        for name, value in ranking(batch).items():
            outputs[name][start:start + batch_size] = value.numpy()

    sorted_index, ranks = _time_ranks(np.asarray(user_ids), np.asarray(order))
    ranks_sorted = ranks[sorted_index]
    starts = np.flatnonzero(ranks_sorted == 0)
    counts = np.diff(np.r_[starts, size])
    adapted_users = np.flatnonzero(counts > settings.support_size)
    towers = melu.tower_weights([ranking.towers[task.name] for task in feature_set.tasks])
    loss_weights = [task.loss_weight for task in feature_set.tasks]
    for first in range(0, adapted_users.size, users_per_chunk):
        users = adapted_users[first:first + users_per_chunk]
        support = sorted_index[starts[users, None] + np.arange(settings.support_size)].ravel()
        batch = {name: tf.constant(value[support]) for name, value in features.items()}
        adapted = melu.adapt(towers, ranking.tower_inputs(batch), _labels(feature_set, batch),
                             tf.constant(np.repeat(np.arange(users.size), settings.support_size), tf.int32),
                             int(users.size), settings.local_steps, settings.local_learning_rate, loss_weights)
        query_counts = counts[users] - settings.support_size
        query = np.concatenate([sorted_index[s + settings.support_size:s + c] for s, c in zip(starts[users], counts[users])])
        local = np.repeat(np.arange(users.size), query_counts).astype(np.int32)
        for part in range(0, query.size, batch_size):
            rows = query[part:part + batch_size]
            per_task = ranking.tower_inputs({name: tf.constant(value[rows]) for name, value in features.items()})
            logits = melu.tower_logits(adapted, per_task, tf.constant(local[part:part + batch_size]))
            for task, logit in zip(feature_set.tasks, logits):
                outputs[task.name][rows] = tf.sigmoid(logit).numpy()
    return outputs


def load_examples(files: Sequence[str], transform_dir: str, feature_set, user_key: str, batch_size: int = 4096
                  ) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """(transformed features, raw `user_key` of each example) of raw gzip TFRecord `files`, in
    file order (one file at a time, so both reads agree on the order)."""
    import tensorflow as tf
    import tensorflow_transform as tft

    from models import trainer

    tft_output = tft.TFTransformOutput(transform_dir)
    parts: Dict[str, List[np.ndarray]] = {}
    users: List[np.ndarray] = []
    for path in sorted(files):
        for batch in trainer.make_dataset([path], tft_output, batch_size, shuffle=False, feature_set=feature_set):
            for name, value in batch.items():
                parts.setdefault(name, []).append(value.numpy())
        for serialized in tf.data.TFRecordDataset(path, compression_type="GZIP").batch(batch_size):
            users.append(tf.io.parse_example(serialized, {user_key: tf.io.FixedLenFeature([], tf.int64)})[user_key].numpy())
    features = {name: np.concatenate(values) for name, values in parts.items()}
    user_ids = np.concatenate(users)
    if any(len(value) != user_ids.size for value in features.values()):
        raise RuntimeError(f"load_examples: transformed features and raw {user_key!r} differ in length")
    return features, user_ids


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Step time of MeLU's meta step against the baseline's Keras train step (what `fit` runs),
    same backbone and batch, on random transformed KuaiRand features (as `poso bench train`;
    users of 32 examples each), in interleaved rounds. Printed, not asserted."""
    import argparse
    import statistics
    import time

    import tensorflow as tf

    import feature_specs as fs
    from models import model as model_lib, model_summary
    from models.optimizers import FusedAdam

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model per round")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args(argv)
    size = 32 * max(args.batch_size // 16, 8)
    features = {k: v.numpy() for k, v in model_summary.random_transformed_features(size, seed=0).items()}
    users, order = np.repeat(np.arange(size // 32), 32), np.tile(np.arange(32), size // 32).astype(np.float32)
    config = model_lib.make_config("baseline")
    _, melu_run = make_trainer(config, fs.KUAIRAND, features, users, order, args.batch_size, seed=0)
    tf.keras.utils.set_random_seed(0)
    baseline = model_lib.RankingModel(config)
    baseline.compile(optimizer=FusedAdam(config.learning_rate))
    data = iter(tf.data.Dataset.from_tensor_slices(features).repeat().batch(args.batch_size))
    train_function = baseline.make_train_function()

    def baseline_run(steps: int) -> None:
        for _ in range(steps):
            logs = train_function(data)
        float(logs["loss"])

    for run in (melu_run, baseline_run):
        run(3)  # traces
    times: Dict[str, List[float]] = {"melu": [], "baseline": []}
    for _ in range(args.repeats):
        for name, run in (("melu", melu_run), ("baseline", baseline_run)):
            started = time.perf_counter()
            run(args.steps)
            times[name].append((time.perf_counter() - started) / args.steps)
    ratios = [m / b for m, b in zip(times["melu"], times["baseline"])]
    print(f"batch {args.batch_size}, {args.steps} steps x {args.repeats} interleaved rounds, {os.cpu_count()} cores: "
          f"MeLU meta step {1000 * statistics.median(times['melu']):.1f} ms, baseline Keras step "
          f"{1000 * statistics.median(times['baseline']):.1f} ms (medians); ratio {statistics.median(ratios):.2f} "
          f"(paired median; rounds {', '.join(f'{r:.2f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
