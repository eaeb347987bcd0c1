"""The multi-task ranking model of the POSO paper (Sec. 3), with switchable POSO modules.

    embeddings(categorical ids)  ++ mean(candidate sequences) ++ dense features  = x  (non-sequential)
    attention(query=x, sequence=[hist_video_ids ; hist_tags] per position, mask=id != 0) = a
    h      = MLP([x ; a])                       plain | POSO(MLP) | MoE gated on all features
    h_t    = MMoE(h)_t for every task t         plain | POSO(MMoE)
    p_t    = sigmoid(tower_t(h_t))              one small tower per task

User cold start (`ModelConfig.user_cold_start`, models.cold_start): Meta-Embedding or MWUF
replace or warm the user-id embedding inside x at serving and evaluation, and train their own
variables on their meta loss (`RankingModel.train_step`).

PIN (`ModelConfig.pin`, models.pin, an interpretation): a tail tower per task besides the
head tower, chosen by the user's AVC bucket; the loss weights each activity group by its prior.

MAIL (`ModelConfig.mail`, models.mail): a zero-shot tower generates a new user's behaviour
sequence from the user's attributes (id and profile embeddings); the attention reads it in place
of the history. The zero-shot tower trains on its own loss with its own optimizer (`train_step`).

All POSO modules read the same personalization code `pc`, built from the transformed
features according to `ModelConfig.pc_source` (see `PC_SOURCES`). Their gates, each its own
2-layer network as in the paper, are computed together by one `layers.PersonalizedGates`
(`RankingModel.gate_network`) and handed to the modules: the same function as gates built
module by module, at a fraction of the training-step cost. The model reads the
outputs of `models.preprocessing.preprocessing_fn`; feature names come from
`feature_specs` only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Tuple

import tensorflow as tf
import tensorflow_recommenders as tfrs

import feature_specs as fs
from models import cold_start, control_flow, layers, mail, melu, pin
from models.optimizers import FusedAdam

__all__ = ["ModelConfig", "VARIANTS", "PC_SOURCES", "make_config", "variants_for", "RankingModel"]

# Sources of the personalization code, each a function of the transformed features:
PC_SOURCES: Tuple[str, ...] = (
    "avc_bucket_onehot",     # one-hot of the fixed AVC bucket (the paper's user-activity PC)
    "avc_bucket_embedding",  # a learned embedding of the AVC bucket
    "avc_raw",               # log1p(AVC) as one float
    "is_new_user",           # the 0/1 new-user flag
    "user_id",               # the user-id embedding, gradient stopped (PC must not train the id)
    "item_age",              # the item's (z-scored log) age: item cold start
    "all_features",          # every non-sequential input (x), gradient stopped: the paper's Table 6 row
)

# PC sources that read one transformed feature each (besides avc_raw: the feature set's PC source).
_FEATURE_PC_SOURCES = {"is_new_user": fs.IS_NEW_USER, "item_age": fs.ITEM_AGE_DAYS}

# KuaiRand's behaviour sequence (a feature set's `behaviour_sequence`): the attention reads,
# per position, the concatenation of these embeddings.
BEHAVIOUR_SEQUENCE: Tuple[str, ...] = fs.KUAIRAND.behaviour_sequence


def check_user_cold_start(method: str, feature_set: fs.FeatureSet) -> None:
    """Raises ValueError when `feature_set` lacks what the user cold-start `method` reads."""
    if method == "none":
        return
    user_id = feature_set.feature(feature_set.user_id)
    if user_id.kind is not fs.Kind.CATEGORICAL:
        raise ValueError(f"user_cold_start {method!r} replaces the user-id embedding, but in feature set "
                         f"{feature_set.name!r} the user id {user_id.name!r} is {user_id.kind.value}, not a model input")
    if not feature_set.user_features:
        raise ValueError(f"user_cold_start {method!r} reads the user's features, and feature set "
                         f"{feature_set.name!r} declares no user_features")


def check_mail(feature_set: fs.FeatureSet) -> None:
    """Raises ValueError when `feature_set` has no user attributes for MAIL to generate behaviour
    from: neither a user-id input nor CATEGORICAL user features (a profile)."""
    if not mail_attribute_names(feature_set):
        raise ValueError(f"MAIL generates behaviour from the user's attributes, and feature set {feature_set.name!r} "
                         "has none: its user id is no model input and it declares no CATEGORICAL user_features "
                         "(a profile; a history is what MAIL generates, not an attribute)")


def _profile_features(feature_set: fs.FeatureSet) -> Tuple[str, ...]:
    """The CATEGORICAL user features (the profile; SEQUENCE user features are history)."""
    return tuple(name for name in feature_set.user_features
                 if feature_set.feature(name).kind is fs.Kind.CATEGORICAL)


def mail_attribute_names(feature_set: fs.FeatureSet) -> Tuple[str, ...]:
    """MAIL's attributes: the user id (when a model input) and the profile features."""
    user_id = feature_set.feature(feature_set.user_id)
    return (((user_id.name,) if user_id.kind is fs.Kind.CATEGORICAL else ()) + _profile_features(feature_set))


def check_pc_source(pc_source: str, feature_set: fs.FeatureSet) -> None:
    """Raises ValueError when `feature_set` lacks the feature `pc_source` reads."""
    needed = _FEATURE_PC_SOURCES.get(pc_source)
    if pc_source == "user_id":
        needed = feature_set.user_id
        if feature_set.feature(needed).kind is not fs.Kind.CATEGORICAL:
            raise ValueError(f"pc_source 'user_id' needs the user id {needed!r} as a model input; in feature set "
                             f"{feature_set.name!r} it is {feature_set.feature(needed).kind.value}")
    if needed is not None and not feature_set.has(needed):
        raise ValueError(f"pc_source {pc_source!r} reads {needed!r}, which feature set {feature_set.name!r} "
                         "does not have")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of `RankingModel`. JSON-friendly (see `to_dict` / `from_dict`).

    mlp / attention / mmoe: module kinds, see `layers.MLP_KINDS` etc.
    pc_source: one of `PC_SOURCES`.
    embedding_dim: if set, overrides every feature's `feature_specs` embedding_dim
      (small models for tests and quick benchmarks).
    """

    mlp: str = "plain"
    attention: str = "plain"
    mmoe: str = "plain"
    pc_source: str = "avc_bucket_onehot"
    gate_scale: float = 2.0
    # The gates read a small code (a 12-bucket one-hot by default): 8 hidden units suffice, and
    # keep the gates' parameters small next to the 256- and 128-wide layers they scale.
    gate_hidden_units: int = 8
    gate_stop_gradient: bool = False
    pc_embedding_dim: int = 8
    # PIN (models.pin, an interpretation): head/tail plugin towers on a backbone trained with
    # backdoor-adjusted gradient aggregation. Head: PC bucket >= pin_head_min_pc_bucket (6:
    # AVC >= 32 with the log2 boundaries) and not new. pin_head_share: P(head) in the training
    # data, None = measured by the Trainer.
    pin: bool = False
    pin_head_min_pc_bucket: int = 6
    pin_head_share: Optional[float] = None
    embedding_dim: Optional[int] = None
    mlp_units: Tuple[int, ...] = (256, 128)
    num_heads: int = 2
    head_dim: int = 16
    num_value_projections: int = 4
    num_experts: int = 4
    expert_units: Tuple[int, ...] = (64,)
    tower_units: Tuple[int, ...] = (32,)
    learning_rate: float = 1e-3
    # User cold start (models.cold_start): "none", "meta_emb" or "mwuf".
    user_cold_start: str = "none"
    # Meta-Embedding: weight of the cold-start loss against the loss after one warm-up step
    # (the paper's alpha, 0.1 there), and that step's size.
    meta_emb_alpha: float = 0.1
    meta_emb_warmup_lr: float = 0.1
    # Meta-Embedding replaces the user-id embedding of new users and of users whose PC (AVC)
    # bucket is at most this; -1 (the default) for new users only.
    meta_emb_max_pc_bucket: int = -1
    # MWUF warms the user-id embedding of new users and of users whose PC (AVC) bucket is at
    # most this (3: AVC < 8 with the log2 boundaries); -1 for new users only.
    mwuf_max_pc_bucket: int = 3
    # MAIL (models.mail): the zero-shot tower's sizes (two hidden widths of every encoder and
    # decoder, the latent width, the attention pooling's width), its dropout, the alignment of p
    # and q ("mmd" with a Gaussian kernel of width mail_mmd_sigma, or "mse"), whether new users'
    # behaviour is generated in training too (the paper; False: at serving and evaluation only,
    # the official code), and its learning rate as a fraction of learning_rate (the code: 1/2).
    mail: bool = False
    # The paper's widths (1024-512-512) are for 128-wide embeddings; ours are 16-24 wide.
    mail_hidden_units: Tuple[int, ...] = (128, 64)
    mail_latent_dim: int = 32
    mail_attention_units: int = 16
    mail_dropout: float = 0.5
    mail_alignment: str = "mmd"
    mail_mmd_sigma: float = 1.0
    mail_fill_in_training: bool = True
    mail_learning_rate_ratio: float = 0.5

    def __post_init__(self):
        for field, kinds in (("mlp", layers.MLP_KINDS), ("attention", layers.ATTENTION_KINDS),
                             ("mmoe", layers.MMOE_KINDS)):
            if getattr(self, field) not in kinds:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: expected one of {kinds}")
        if self.pc_source not in PC_SOURCES:
            raise ValueError(f"ModelConfig.pc_source={self.pc_source!r}: expected one of {PC_SOURCES}")
        for field in ("mlp_units", "expert_units", "tower_units", "mail_hidden_units"):
            value = getattr(self, field)
            if isinstance(value, (str, bytes)) or not all(isinstance(v, int) and v > 0 for v in value):
                raise ValueError(f"ModelConfig.{field}={value!r}: expected a sequence of positive ints")
            object.__setattr__(self, field, tuple(value))  # JSON gives lists
        if not (isinstance(self.pin_head_min_pc_bucket, int) and self.pin_head_min_pc_bucket >= 1):
            raise ValueError(f"ModelConfig.pin_head_min_pc_bucket={self.pin_head_min_pc_bucket!r}: expected an int >= 1")
        if self.pin_head_share is not None and not 0.0 <= self.pin_head_share <= 1.0:
            raise ValueError(f"ModelConfig.pin_head_share={self.pin_head_share!r}: expected in [0, 1] or None")
        if self.embedding_dim is not None and self.embedding_dim <= 0:
            raise ValueError(f"ModelConfig.embedding_dim={self.embedding_dim!r}: "
                             "expected a positive int or None")
        if not self.learning_rate > 0:
            raise ValueError(f"ModelConfig.learning_rate={self.learning_rate!r}: expected > 0")
        if self.user_cold_start not in cold_start.USER_COLD_START_METHODS:
            raise ValueError(f"ModelConfig.user_cold_start={self.user_cold_start!r}: expected one of "
                             f"{cold_start.USER_COLD_START_METHODS}")
        if not 0.0 <= self.meta_emb_alpha <= 1.0:
            raise ValueError(f"ModelConfig.meta_emb_alpha={self.meta_emb_alpha!r}: expected in [0, 1]")
        if not self.meta_emb_warmup_lr >= 0:
            raise ValueError(f"ModelConfig.meta_emb_warmup_lr={self.meta_emb_warmup_lr!r}: expected >= 0")
        for field in ("meta_emb_max_pc_bucket", "mwuf_max_pc_bucket"):
            if not (isinstance(getattr(self, field), int) and getattr(self, field) >= -1):
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: expected an int >= -1")
        self._check_mail()

    def _check_mail(self) -> None:
        if len(self.mail_hidden_units) != 2:
            raise ValueError(f"ModelConfig.mail_hidden_units={self.mail_hidden_units!r}: expected two widths")
        for field in ("mail_latent_dim", "mail_attention_units"):
            if not (isinstance(getattr(self, field), int) and getattr(self, field) > 0):
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: expected a positive int")
        if not 0.0 <= self.mail_dropout < 1.0:
            raise ValueError(f"ModelConfig.mail_dropout={self.mail_dropout!r}: expected in [0, 1)")
        if self.mail_alignment not in mail.ALIGNMENTS:
            raise ValueError(f"ModelConfig.mail_alignment={self.mail_alignment!r}: expected one of {mail.ALIGNMENTS}")
        for field in ("mail_mmd_sigma", "mail_learning_rate_ratio"):
            if not getattr(self, field) > 0:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: expected > 0")
        if self.mail and self.user_cold_start != "none":
            raise ValueError(f"ModelConfig: mail and user_cold_start={self.user_cold_start!r} are exclusive "
                             "(each trains its own variables on its own loss)")

    @property
    def uses_poso(self) -> bool:
        return "poso" in (self.mlp, self.attention, self.mmoe)

    def replace(self, **overrides: Any) -> "ModelConfig":
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; known: "
                             f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        return cls().replace(**dict(values))


VARIANTS: Dict[str, ModelConfig] = {
    "baseline": ModelConfig(),
    "moe": ModelConfig(mlp="moe"),
    "poso_mlp": ModelConfig(mlp="poso"),
    "poso_mha": ModelConfig(attention="poso"),
    "poso_mmoe": ModelConfig(mmoe="poso"),
    "poso_all": ModelConfig(mlp="poso", attention="poso", mmoe="poso"),
    "meta_emb": ModelConfig(user_cold_start="meta_emb"),
    "mwuf": ModelConfig(user_cold_start="mwuf"),
    "pin": ModelConfig(pin=True),
    "mail": ModelConfig(mail=True),
}


def make_config(variant: str = "baseline", feature_set: Optional[fs.FeatureSet] = None,
                **overrides: Any) -> ModelConfig:
    """The named preset `variant` with `overrides` applied (checked against `feature_set` if given)."""
    if variant == "melu":
        raise ValueError(melu.BENCHMARK_ONLY_REASON)
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; known: {sorted(VARIANTS)}")
    config = VARIANTS[variant].replace(**overrides)
    if feature_set is not None:
        check_pc_source(config.pc_source, feature_set)
        check_user_cold_start(config.user_cold_start, feature_set)
        if config.mail:
            check_mail(feature_set)
    return config


def variants_for(feature_set: fs.FeatureSet) -> Tuple[str, ...]:
    """The `VARIANTS` a model over `feature_set` can be (meta_emb and mwuf need a user-id input and
    user features, mail user attributes)."""
    usable = []
    for name, config in VARIANTS.items():
        try:
            make_config(name, feature_set)
        except ValueError:
            continue
        usable.append(name)
    return tuple(usable)


def _masked_mean(embedded: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Mean over real positions of [B, L, D] -> [B, D]; all-padding rows give zeros."""
    weights = tf.cast(mask, embedded.dtype)[:, :, tf.newaxis]
    return tf.reduce_sum(embedded * weights, axis=1) / tf.maximum(tf.reduce_sum(weights, axis=1), 1.0)


class RankingModel(tfrs.Model):
    """Multi-task ranking model; `call` maps transformed features to {task: probability [B]}."""

    def __init__(self, config: ModelConfig = ModelConfig(), feature_set: fs.FeatureSet = fs.KUAIRAND,
                 name: str = "ranking_model", **kwargs):
        super().__init__(name=name, **kwargs)
        check_pc_source(config.pc_source, feature_set)
        check_user_cold_start(config.user_cold_start, feature_set)
        if config.mail:
            check_mail(feature_set)
        self.config = config
        self.feature_set = feature_set
        self._categorical = feature_set.features_of_kind(fs.Kind.CATEGORICAL)
        sequences = feature_set.features_of_kind(fs.Kind.SEQUENCE)
        self._pooled_sequences = tuple(f for f in sequences if f.name not in feature_set.behaviour_sequence)
        self._behaviour = tuple(feature_set.feature(name) for name in feature_set.behaviour_sequence)
        # Dense inputs: the z-scored numerics and the personalization sources. The PC sources
        # are ordinary inputs for every variant, so POSO's gain is not extra information.
        self._dense = tuple(f.name for f in feature_set.features_of_kind(fs.Kind.NUMERIC, fs.Kind.PERSONALIZATION))

        self.embeddings = {
            f.name: tf.keras.layers.Embedding(f.cardinality, config.embedding_dim or f.embedding_dim,
                                              name=f"{f.name}_embedding")
            for f in self._categorical + sequences
        }
        self.pc_embedding = (tf.keras.layers.Embedding(feature_set.pc.num_buckets, config.pc_embedding_dim,
                                                       name="pc_embedding")
                             if config.pc_source == "avc_bucket_embedding" else None)
        gate_options = dict(gate_hidden_units=config.gate_hidden_units, gate_scale=config.gate_scale,
                            gate_stop_gradient=config.gate_stop_gradient)
        self.attention = layers.make_attention(
            config.attention, num_heads=config.num_heads, head_dim=config.head_dim,
            num_value_projections=config.num_value_projections, name="attention", **gate_options)
        self.mlp = layers.make_mlp(config.mlp, config.mlp_units, num_experts=config.num_experts,
                                   name="mlp", **gate_options)
        self.mmoe = layers.make_mmoe(config.mmoe, num_tasks=len(feature_set.tasks), num_experts=config.num_experts,
                                     expert_units=config.expert_units, name="mmoe", **gate_options)
        # Every POSO module's gates in one network (see the module docstring); None without POSO.
        gate_units = [units for module in self._modules_with_gates().values() for units in module.gate_units]
        # A one-hot PC takes num_buckets values: the gates are then computed once per bucket.
        self.gate_network = (layers.PersonalizedGates(
            gate_units, hidden_units=config.gate_hidden_units, scale=config.gate_scale,
            stop_gradient=config.gate_stop_gradient, one_hot_code=config.pc_source == "avc_bucket_onehot",
            name="gates") if gate_units else None)
        # {task: its tower}; with PIN, its head and tail plugin towers in one `pin.PluginTowers`.
        self.towers = self._make_pin_towers() if config.pin else self._make_towers()
        user_dim = config.embedding_dim or feature_set.feature(feature_set.user_id).embedding_dim
        cold_start_layers = {"meta_emb": cold_start.MetaEmbeddingGenerator, "mwuf": cold_start.MetaWarmUp}
        # The user cold-start method's layer (None without one): its variables train on its meta loss only.
        self.cold_start = (cold_start_layers[config.user_cold_start](user_dim, name=config.user_cold_start)
                           if config.user_cold_start != "none" else None)
        # MAIL's zero-shot tower and its own optimizer (None without MAIL).
        self.zero_shot, self.zero_shot_optimizer = (self._make_zero_shot() if config.mail else (None, None))
        self.tasks = {
            task.name: tfrs.tasks.Ranking(
                # Per-example losses, averaged in compute_loss over the global batch: Keras refuses
                # its automatic reduction inside a distribution strategy's replicas.
                loss=tf.keras.losses.BinaryCrossentropy(reduction=tf.keras.losses.Reduction.NONE),
                metrics=[tf.keras.metrics.AUC(name=f"{task.name}_auc")],
                name=f"{task.name}_task")
            for task in feature_set.tasks
        }

    def _make_towers(self) -> Dict[str, tf.keras.Sequential]:
        return {
            task.name: tf.keras.Sequential(
                # Task-prefixed names: a Sequential builds outside the model's name scope, and
                # warm starts match variables by name.
                [tf.keras.layers.Dense(units, activation="relu", name=f"{task.name}_hidden_{i}")
                 for i, units in enumerate(self.config.tower_units)]
                + [tf.keras.layers.Dense(1, activation="sigmoid", name=f"{task.name}_probability")],
                name=f"{task.name}_tower")
            for task in self.feature_set.tasks
        }

    def _make_pin_towers(self) -> Dict[str, pin.PluginTowers]:
        return {task.name: pin.PluginTowers(self.config.tower_units, name=f"{task.name}_plugin_towers")
                for task in self.feature_set.tasks}

    def _make_zero_shot(self) -> Tuple[mail.ZeroShotTower, tf.keras.optimizers.Optimizer]:
        config = self.config
        tower = mail.ZeroShotTower(
            [self.embeddings[name].output_dim for name in mail_attribute_names(self.feature_set)],
            behaviour_length=self._behaviour[0].max_length,
            behaviour_dim=sum(self.embeddings[f.name].output_dim for f in self._behaviour),
            hidden_units=config.mail_hidden_units, latent_dim=config.mail_latent_dim,
            attention_units=config.mail_attention_units, dropout=config.mail_dropout,
            alignment=config.mail_alignment, mmd_sigma=config.mail_mmd_sigma, name="mail")
        return tower, FusedAdam(config.learning_rate * config.mail_learning_rate_ratio)

    # -- inputs --------------------------------------------------------------------------

    def _non_sequential(self, features: Mapping[str, tf.Tensor],
                        user_embedding: Optional[tf.Tensor] = None) -> tf.Tensor:
        """x; `user_embedding` [B, d], if given, stands for the user-id embedding."""
        parts = [user_embedding if user_embedding is not None and f.name == self.feature_set.user_id
                 else self.embeddings[f.name](features[f.name]) for f in self._categorical]
        for f in self._pooled_sequences:
            ids = features[f.name]
            parts.append(_masked_mean(self.embeddings[f.name](ids), ids != fs.PADDING_INDEX))
        parts.append(tf.stack([tf.cast(features[name], tf.float32) for name in self._dense], axis=1))
        return tf.concat(parts, axis=1)

    def _behaviour_sequence(self, features: Mapping[str, tf.Tensor]) -> Tuple[tf.Tensor, tf.Tensor]:
        ids = [features[f.name] for f in self._behaviour]
        sequence = tf.concat([self.embeddings[f.name](x) for f, x in zip(self._behaviour, ids)], axis=-1)
        mask = tf.reduce_any(tf.stack([x != fs.PADDING_INDEX for x in ids], axis=0), axis=0)
        return sequence, mask

    def personalization_code(self, features: Mapping[str, tf.Tensor],
                             non_sequential: Optional[tf.Tensor] = None) -> tf.Tensor:
        """The PC all POSO gates read, [B, pc_dim], per `config.pc_source`.

        "all_features" is x, the non-sequential inputs (embeddings, pooled sequences, dense
        features; `non_sequential` if already computed) with the gradient stopped, as for the
        user id: the gates read the embeddings but do not train them.
        """
        source = self.config.pc_source
        if source == "all_features":
            return tf.stop_gradient(self._non_sequential(features) if non_sequential is None else non_sequential)
        if source == "avc_bucket_onehot":
            return tf.one_hot(features[fs.PC_BUCKET], self.feature_set.pc.num_buckets, dtype=tf.float32)
        if source == "avc_bucket_embedding":
            return self.pc_embedding(features[fs.PC_BUCKET])
        if source == "user_id":
            user_id = self.feature_set.user_id
            return tf.stop_gradient(self.embeddings[user_id](features[user_id]))
        name = self.feature_set.pc.source if source == "avc_raw" else _FEATURE_PC_SOURCES[source]
        return tf.cast(features[name], tf.float32)[:, tf.newaxis]

    # -- forward -------------------------------------------------------------------------

    @tf.autograph.experimental.do_not_convert
    def tower_inputs(self, features: Mapping[str, tf.Tensor],
                     user_embedding: Optional[tf.Tensor] = None, training: bool = False) -> List[tf.Tensor]:
        """The last hidden activations: the MMoE's output for each task (in task order), i.e.
        what the towers read. The paper's Fig. 1b measures how these move when a feature is
        masked. `user_embedding`: see `_non_sequential`. With MAIL, new users' behaviour is
        generated (`mail_behaviour_sequence`)."""
        non_sequential = self._non_sequential(features, user_embedding)
        gates = self._module_gates(self.personalization_code(features, non_sequential))
        sequence, mask = self.mail_behaviour_sequence(features, training)
        attended = self.attention(non_sequential, sequence, mask=mask, gates=gates.get("attention"))
        hidden = self.mlp(tf.concat([non_sequential, attended], axis=1), gates=gates.get("mlp"))
        return self.mmoe(hidden, gates=gates.get("mmoe"))

    def _modules_with_gates(self) -> Dict[str, tf.keras.layers.Layer]:
        modules = {"attention": self.attention, "mlp": self.mlp, "mmoe": self.mmoe}
        return {name: module for name, module in modules.items() if module.gate_units}

    def gates_by_module(self) -> Dict[str, List[int]]:
        """{"attention" | "mlp" | "mmoe": the indices of its gates in `gate_network`} for the
        POSO modules, in the module's `gate_units` order."""
        indices, start = {}, 0
        for name, module in self._modules_with_gates().items():
            indices[name] = list(range(start, start + len(module.gate_units)))
            start += len(module.gate_units)
        return indices

    def _module_gates(self, pc: tf.Tensor) -> Dict[str, List[tf.Tensor]]:
        """{module name: its gate values, in the module's `gate_units` order} for the POSO modules."""
        if self.gate_network is None:
            return {}
        values = self.gate_network(pc)
        return {name: [values[i] for i in indices] for name, indices in self.gates_by_module().items()}

    # Python control flow here and in the layers is static (loops over features and
    # layers), so AutoGraph has nothing to convert; skipping it makes tracing faster.
    @tf.autograph.experimental.do_not_convert
    def call(self, features: Mapping[str, tf.Tensor], training: bool = False) -> Dict[str, tf.Tensor]:
        missing = sorted(set(self.input_feature_names) - set(features))
        if missing:
            raise KeyError(f"RankingModel: transformed features {missing} are missing; "
                           f"got {sorted(features)}")
        return self._predict(features, None if training else self.serving_user_embedding(features), training)

    def _predict(self, features: Mapping[str, tf.Tensor],
                 user_embedding: Optional[tf.Tensor] = None, training: bool = False) -> Dict[str, tf.Tensor]:
        per_task = self.tower_inputs(features, user_embedding, training)
        return self.task_probabilities(features, per_task)

    def task_probabilities(self, features: Mapping[str, tf.Tensor], per_task: List[tf.Tensor]) -> Dict[str, tf.Tensor]:
        """{task: p [B]} from the towers' inputs; with PIN, each example's from its group's tower.
        PIN runs a task's head and tail towers as one `pin.PluginTowers` on every row: one MatMul
        per layer for both groups, the other group's units masked to zero, so its served graph
        has about the baseline's node count (benchmarks/README.md: two Dense towers and a
        `tf.where` cost more, and skipping the tail towers with `control_flow.if_any` more still)."""
        if not self.config.pin:
            return {task.name: tf.squeeze(self.towers[task.name](x), axis=-1)
                    for task, x in zip(self.feature_set.tasks, per_task)}
        head = self.pin_head_mask(features)
        return {task.name: tf.squeeze(self.towers[task.name](x, head), axis=-1)
                for task, x in zip(self.feature_set.tasks, per_task)}

    def pin_head_mask(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """[B] bool: PIN's head users (see models.pin.head_mask)."""
        return pin.head_mask(features, self.feature_set, self.config.pin_head_min_pc_bucket)

    # -- MAIL (models.mail) ----------------------------------------------------------------

    def _mail_attribute_tokens(self, features: Mapping[str, tf.Tensor]) -> Tuple[tf.Tensor, tf.Tensor]:
        """MAIL's attribute tokens [B, F, d_a] and its target a [B, sum d_i], gradient stopped."""
        embedded = [tf.stop_gradient(self.embeddings[name](features[name]))
                    for name in mail_attribute_names(self.feature_set)]
        return mail.attribute_tokens(embedded), tf.concat(embedded, axis=1)

    def mail_behaviour_sequence(self, features: Mapping[str, tf.Tensor],
                                training: bool = False) -> Tuple[tf.Tensor, tf.Tensor]:
        """The behaviour sequence and mask the attention reads.

        Without MAIL (or in training with mail_fill_in_training False): the history's. With MAIL:
        new users' rows (`cold_start.new_user_mask`) hold v_hat = D2(E1(pool_a(a))), all positions
        real, gradient stopped (the ranking loss never trains the zero-shot tower). The generator
        runs on the new users' rows only, gathered (tf.where / tf.gather) and scattered back
        (tf.tensor_scatter_nd_update); outside training, only when the batch has a new user
        (`control_flow.if_any`). Without dropout in training too, so the ranking tower trains on what
        serving serves.
        """
        sequence, mask = self._behaviour_sequence(features)
        if self.zero_shot is None or (training and not self.config.mail_fill_in_training):
            return sequence, mask
        new_users = cold_start.new_user_mask(features, self.feature_set)

        def substitute():
            rows = tf.where(new_users)
            gathered = {name: tf.gather_nd(features[name], rows) for name in mail_attribute_names(self.feature_set)}
            generated = tf.stop_gradient(self.zero_shot.generate(self._mail_attribute_tokens(gathered)[0]))
            return (tf.tensor_scatter_nd_update(sequence, rows, tf.cast(generated, sequence.dtype)),
                    tf.tensor_scatter_nd_update(mask, rows, tf.ones_like(generated[:, :, 0], dtype=tf.bool)))

        if training:  # nearly every training batch has new users: no branch to skip
            return substitute()
        return control_flow.if_any(new_users, substitute, lambda: (tf.identity(sequence), tf.identity(mask)))

    def mail_rows(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """[B] bool: the rows MAIL's zero-shot tower learns from: users with behaviour (not new, and
        at least one real history position)."""
        _, mask = self._behaviour_sequence(features)
        return tf.reduce_any(mask, axis=1) & ~cold_start.new_user_mask(features, self.feature_set)

    def mail_losses(self, features: Mapping[str, tf.Tensor], training: bool = False) -> Dict[str, tf.Tensor]:
        """MAIL's zero-shot losses (models.mail.ZeroShotTower.losses_of) on the batch's `mail_rows`,
        on gradient-stopped copies of the embeddings."""
        tokens, attributes = self._mail_attribute_tokens(features)
        sequence, mask = self._behaviour_sequence(features)
        return self.zero_shot.losses_of(tokens, attributes, tf.stop_gradient(sequence), mask,
                                        self.mail_rows(features), training=training)

    # -- user cold start (models.cold_start) ---------------------------------------------

    def _user_features(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """z: the user-feature embeddings (a SEQUENCE one mean-pooled), concatenated, gradient stopped."""
        parts = []
        for name in self.feature_set.user_features:
            embedded = self.embeddings[name](features[name])
            if self.feature_set.feature(name).kind is fs.Kind.SEQUENCE:
                embedded = _masked_mean(embedded, features[name] != fs.PADDING_INDEX)
            parts.append(embedded)
        return tf.stop_gradient(tf.concat(parts, axis=1))

    def _history_item_mean(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """m: mean embedding of the behaviour history's item ids (its first sequence), gradient stopped."""
        ids = features[self.feature_set.behaviour_sequence[0]]
        embedded = self.embeddings[self.feature_set.behaviour_sequence[0]](ids)
        return tf.stop_gradient(_masked_mean(embedded, ids != fs.PADDING_INDEX))

    def _cold_start_applies(self, features: Mapping[str, tf.Tensor], max_pc_bucket: int) -> tf.Tensor:
        """[B] bool: the method applies to this user (new, or PC bucket <= max_pc_bucket)."""
        low_bucket = features[fs.PC_BUCKET] <= tf.cast(max_pc_bucket, features[fs.PC_BUCKET].dtype)
        return cold_start.new_user_mask(features, self.feature_set) | low_bucket

    def serving_user_embedding(self, features: Mapping[str, tf.Tensor]) -> Optional[tf.Tensor]:
        """The user-id embedding the model serves and evaluates with; None without a cold-start method.

        meta_emb: the generated phi for new users (and PC bucket <= meta_emb_max_pc_bucket), e for the others.
        mwuf: the warmed e' for new users (and PC bucket <= mwuf_max_pc_bucket), e for the others.
        """
        if self.cold_start is None:
            return None
        user_id = self.feature_set.user_id
        embedding = self.embeddings[user_id](features[user_id])
        if self.config.user_cold_start == "meta_emb":
            replace, substitute = (self._cold_start_applies(features, self.config.meta_emb_max_pc_bucket),
                                   self.cold_start(self._user_features(features)))
        else:
            replace, substitute = (self._cold_start_applies(features, self.config.mwuf_max_pc_bucket),
                                   self.cold_start(embedding, self._user_features(features),
                                                   self._history_item_mean(features)))
        return tf.where(replace[:, tf.newaxis], substitute, embedding)

    def cold_start_loss(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """The cold-start method's meta loss (trains `self.cold_start` only, see `train_step`).

        meta_emb: `cold_start.meta_embedding_loss` with phi from every example's user features.
        mwuf: the model's loss with e' for every example (the meta networks learn from all
        users; serving applies them to cold ones).
        """
        per_example = lambda embedding: self.per_example_loss(features, self._predict(features, embedding))
        if self.config.user_cold_start == "meta_emb":
            phi = self.cold_start(self._user_features(features))
            return cold_start.meta_embedding_loss(per_example, phi, features[self.feature_set.user_id],
                                                  self.config.meta_emb_alpha, self.config.meta_emb_warmup_lr)[0]
        user_id = self.feature_set.user_id
        embedding = tf.stop_gradient(self.embeddings[user_id](features[user_id]))
        warmed = self.cold_start(embedding, self._user_features(features), self._history_item_mean(features))
        return tf.reduce_mean(per_example(warmed))

    def per_example_loss(self, features: Mapping[str, tf.Tensor], predictions: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """[B]: sum over tasks of loss_weight * binary cross-entropy (no metrics updated)."""
        losses = []
        for task in self.feature_set.tasks:
            labels = tf.cast(features[task.label], tf.float32)[:, tf.newaxis]
            losses.append(task.loss_weight * tf.keras.losses.binary_crossentropy(
                labels, predictions[task.name][:, tf.newaxis]))
        return tf.add_n(losses)

    def train_step(self, inputs):
        """tfrs.Model's step; with a cold-start method, its variables train on `cold_start_loss`
        and every other variable on the usual loss (one optimizer step); with MAIL, see `_mail_train_step`."""
        if self.zero_shot is not None:
            return self._mail_train_step(inputs)
        if self.cold_start is None:
            return super().train_step(inputs)
        with tf.GradientTape(persistent=True) as tape:
            loss = self.compute_loss(inputs, training=True)
            regularization_loss = tf.reduce_sum([tf.reduce_sum(loss) for loss in self.losses])
            total_loss = loss + regularization_loss
            meta_loss = self.cold_start_loss(inputs)
        meta_variables = self.cold_start.trainable_variables
        meta_refs = {v.ref() for v in meta_variables}
        main_variables = [v for v in self.trainable_variables if v.ref() not in meta_refs]
        gradients = tape.gradient(total_loss, main_variables) + tape.gradient(meta_loss, meta_variables)
        del tape
        self.optimizer.apply_gradients(zip(gradients, main_variables + meta_variables))
        metrics = {metric.name: metric.result() for metric in self.metrics}
        metrics.update(loss=loss, regularization_loss=regularization_loss, total_loss=total_loss,
                       cold_start_loss=meta_loss)
        return metrics

    def _mail_train_step(self, inputs):
        """MAIL's co-training step: two optimizers on disjoint variables. The model's optimizer
        applies the ranking loss's gradient to every variable but the zero-shot tower's;
        `zero_shot_optimizer` (learning rate mail_learning_rate_ratio * learning_rate) applies
        the zero-shot loss's gradient to the zero-shot tower's variables. Neither loss reaches the
        other's variables (stop-gradients both ways, see `mail_behaviour_sequence`, `mail_losses`)."""
        with tf.GradientTape(persistent=True) as tape:
            loss = self.compute_loss(inputs, training=True)
            regularization_loss = tf.reduce_sum([tf.reduce_sum(loss) for loss in self.losses])
            total_loss = loss + regularization_loss
            zero_shot = self.mail_losses(inputs, training=True)
        zero_shot_variables = self.zero_shot.trainable_variables
        zero_shot_refs = {v.ref() for v in zero_shot_variables}
        ranking_variables = [v for v in self.trainable_variables if v.ref() not in zero_shot_refs]
        self.optimizer.apply_gradients(zip(tape.gradient(total_loss, ranking_variables), ranking_variables))
        self.zero_shot_optimizer.apply_gradients(
            zip(tape.gradient(zero_shot["total"], zero_shot_variables), zero_shot_variables))
        del tape
        metrics = {metric.name: metric.result() for metric in self.metrics}
        metrics.update(loss=loss, regularization_loss=regularization_loss, total_loss=total_loss,
                       zero_shot_loss=zero_shot["total"], zero_shot_alignment=zero_shot["alignment"])
        return metrics

    @property
    def input_feature_names(self) -> Tuple[str, ...]:
        """The transformed features `call` reads."""
        names = [f.name for f in self._categorical + self._pooled_sequences + self._behaviour]
        names += list(self._dense) + [fs.PC_BUCKET]
        return tuple(dict.fromkeys(names))

    def gate_outputs(self, features: Mapping[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        """Every personalized gate's output for a batch: {"<module>_<gate>": [B, units]}.

        Empty for a model without POSO modules. Plot against the PC (e.g. user activity)
        to reproduce the paper's Fig. 4.
        """
        gates = self._module_gates(self.personalization_code(features))
        return {f"{name}_{gate_name}": value
                for name, module in self._modules_with_gates().items()
                for gate_name, value in zip(module.gate_names, gates[name])}

    # -- training ------------------------------------------------------------------------

    def compute_loss(self, features: Mapping[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """Sum over tasks of loss_weight * binary cross-entropy of the task's label.

        Each task's cross-entropy is averaged over the global batch (tf.nn.compute_average_loss):
        the batch mean on one replica; under MultiWorkerMirroredStrategy each replica's share,
        which the strategy's gradient all-reduce sums to the global mean. PIN: weighted per example
        by `pin.backdoor_weights` (per replica's batch); the task AUC metrics stay unweighted."""
        predictions = self(features, training=training)
        # PIN: example weights that make the loss sum_k P(z_k) * mean loss of group k (models.pin).
        sample_weight = (pin.backdoor_weights(self.pin_head_mask(features), self.pin_head_share)
                         if self.config.pin else None)
        losses = []
        for task in self.feature_set.tasks:
            if task.label not in features:
                raise KeyError(f"RankingModel.compute_loss: label {task.label!r} of task {task.name!r} "
                               "is missing from the batch")
            labels = tf.cast(features[task.label], tf.float32)[:, tf.newaxis]
            per_example = self.tasks[task.name](labels=labels, predictions=predictions[task.name][:, tf.newaxis],
                                                training=training)
            losses.append(task.loss_weight * tf.nn.compute_average_loss(per_example, sample_weight=sample_weight))
        return tf.add_n(losses)

    @property
    def pin_head_share(self) -> float:
        if self.config.pin_head_share is None:
            raise ValueError("ModelConfig.pin_head_share is None: set P(head) of the training data "
                             "(models.trainer measures it before training)")
        return self.config.pin_head_share

    def get_config(self) -> Dict[str, Any]:
        return {"config": self.config.to_dict(), "name": self.name, "feature_set": self.feature_set.name}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "RankingModel":
        return cls(ModelConfig.from_dict(config["config"]), fs.feature_set(config.get("feature_set", "kuairand")),
                   name=config.get("name", "ranking_model"))
