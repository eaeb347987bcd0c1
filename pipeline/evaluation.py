"""TFMA evaluation of a candidate model: metrics per task, slices, and blessing thresholds."""

from __future__ import annotations

from tfx import v1 as _tfx  # noqa: F401  (registers TFMA's config protos under tfma.*)
import tensorflow_model_analysis as tfma

from feature_specs import specs
from models import metrics
from pipeline import config as config_lib

GAUC_METRIC = metrics.GAUC_NAME  # our TFMA custom metric: TFMA has no grouped AUC
SLICE_KEYS = (specs.USER_GROUP, specs.AVC_BUCKET)


def _metrics(primary: bool):
    # GAUC, AUC, log loss, count and means, all from one walk over each output's examples per
    # slice (models/metrics.py says why TFMA's own AUC and log loss are not used).
    configs = metrics.ranking_metric_configs()
    auc, gauc = configs[metrics.AUC_NAME], configs[metrics.GAUC_NAME]
    if primary:
        # The floor holds overall and on the primary tasks only: small slices of a day, and
        # rare tasks (a day may hold a few dozen follows), are too noisy for a hard floor.
        auc.per_slice_thresholds.add(
            slicing_specs=[tfma.SlicingSpec()],
            threshold=tfma.MetricThreshold(value_threshold=tfma.GenericValueThreshold(
                lower_bound={"value": config_lib.AUC_FLOOR})))
        # New users' GAUC may not fall much below the last blessed model's.
        gauc.per_slice_thresholds.add(
            slicing_specs=[tfma.SlicingSpec(feature_values={specs.USER_GROUP: "new"})],
            threshold=tfma.MetricThreshold(change_threshold=tfma.GenericChangeThreshold(
                direction=tfma.MetricDirection.HIGHER_IS_BETTER,
                absolute={"value": -config_lib.MAX_NEW_USER_GAUC_DROP})))
    return list(configs.values())


def make_eval_config() -> tfma.EvalConfig:
    """GAUC, AUC and log loss (and count, mean label and prediction) per task, overall and per
    user group and AVC bucket.

    Blessing, on the primary tasks: the overall AUC above AUC_FLOOR, and the new-user GAUC no
    more than MAX_NEW_USER_GAUC_DROP below the last blessed model's (the first run has no
    baseline, so only the floors apply). The other tasks are measured, not gated.
    """
    primary = [t.name for t in specs.TASKS if t.primary]
    secondary = [t.name for t in specs.TASKS if not t.primary]
    metrics_specs = [tfma.MetricsSpec(output_names=primary, metrics=_metrics(primary=True))]
    if secondary:
        metrics_specs.append(tfma.MetricsSpec(output_names=secondary, metrics=_metrics(primary=False)))
    return tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(signature_name="serving_default",
                                    label_keys={t.name: t.label for t in specs.TASKS})],
        slicing_specs=[tfma.SlicingSpec()] + [tfma.SlicingSpec(feature_keys=[k]) for k in SLICE_KEYS],
        metrics_specs=metrics_specs)
