"""The evaluation of a candidate model as a TFMA EvalConfig (metrics per task, slices) and the
blessing thresholds. The Evaluator (components/batch_evaluator.py) computes this EvalConfig as
TFMA would, in TFMA's output format; `tfma.run_model_analysis` runs it too (the tests compare)."""

from __future__ import annotations

from tfx import v1 as _tfx  # noqa: F401  (registers TFMA's config protos under tfma.*)
import tensorflow_model_analysis as tfma

from feature_specs import specs
from models import metrics
from pipeline import config as config_lib

GAUC_METRIC = metrics.GAUC_NAME  # our TFMA custom metric: TFMA has no grouped AUC
SLICE_KEYS = (specs.USER_GROUP, specs.AVC_BUCKET)


def make_eval_config() -> tfma.EvalConfig:
    """GAUC, AUC and log loss (and count, mean label and prediction) per task, overall and per
    user group and AVC bucket, for the candidate and the last blessed model.

    No TFMA thresholds: the blessing is decided after the Evaluator from these metrics, with
    margins that depend on each slice's size (pipeline/blessing.py, `blessing_thresholds`).
    """
    # GAUC, AUC, log loss, count and means, all from one walk over each output's examples per
    # slice (models/metrics.py says why TFMA's own AUC and log loss are not used).
    return tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(signature_name="serving_default",
                                    label_keys={t.name: t.label for t in specs.TASKS})],
        slicing_specs=[tfma.SlicingSpec()] + [tfma.SlicingSpec(feature_keys=[k]) for k in SLICE_KEYS],
        metrics_specs=[tfma.MetricsSpec(output_names=[t.name for t in specs.TASKS],
                                        metrics=list(metrics.ranking_metric_configs().values()))])


def blessing_thresholds() -> dict:
    """The BlessingGate's settings (an execution property, so a change decides again)."""
    return {"tasks": [t.name for t in specs.TASKS if t.primary], "auc_floor": config_lib.AUC_FLOOR,
            "max_auc_drop": config_lib.MAX_AUC_DROP, "max_new_user_gauc_drop": config_lib.MAX_NEW_USER_GAUC_DROP,
            "z": config_lib.BLESSING_Z, "min_slice_size": config_lib.MIN_SLICE_SIZE}
