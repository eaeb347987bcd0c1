"""The daily POSO ranking pipeline: one create_pipeline used by every runner.

For the run date D:
  previous_user_state (state through D-1) -> AvcExampleGen(D) -> StatisticsGen -> ExampleValidator
  (against the schema derived from feature_specs) -> SchemaAnomaliesGate;
  training_window (spans D-7..D-1, each validated) -> Transform (analyzing only the spans the
  previous window's analyzer cache lacks) -> Trainer -> Evaluator on span D
  (metrics of the candidate and the last blessed model) -> BlessingGate (pipeline/blessing.py)
  + ServingInfraValidator -> Pusher (blessed models only, one version per day) ->
  ServingConfigWriter (models.config beside TF Serving's base directory; a rollback's pin holds).
`ingest_only` builds just the first part: how earlier days are ingested in order.

`for_kubeflow=True` builds the same DAG for KubeflowV2DagRunner, which compiles only TFX's
LatestArtifactStrategy and LatestBlessedModelStrategy resolvers: the user state through D-1 and
the training window come from the span registry (`RegisteredUserState`, `SpanWindowExamples` in
components/span_registry.py) instead of `SpanWindowStrategy`, the baseline is TFX's latest
blessed model (a rerun of a day may then compare against that day's own earlier push), and
Transform analyzes the whole window (the registry copies each day's window into one new
artifact, so tf.Transform's per-dataset cache would never match). The date
is the runtime parameter `date`, so one compiled spec serves every daily run; the day's input
fingerprint, part of AvcExampleGen's cache key, is then computed by a task at run time
(`DayInputFingerprint`) instead of when the pipeline is built.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from tfx import v1 as tfx

from components import impression_logs
from components.avc_example_gen import SPLIT, AvcExampleGen, UserState, quarantine_dir_of, span_of
from components.batch_evaluator import BatchEvaluator
from components.exactly_once_pusher import ExactlyOncePusher
from components.infra_validator import ServingInfraValidator
from components.input_fingerprint import DayInputFingerprint
from components.serving_config_writer import ServingConfigWriter
from components.span_registry import RegisteredUserState, SpanWindowExamples, registry_dir_of
from components.span_window import (BaselineModelStrategy, EarlierWindowCacheStrategy, SchemaAnomaliesGate,
                                    SpanWindowStrategy)
from pipeline import config as config_lib
from pipeline import evaluation
from pipeline.blessing import BlessingGate

# The Kubeflow task that fingerprints the day's log files at run time (never taken from KFP's cache).
INPUT_FINGERPRINT_ID = "input_fingerprint"


def create_pipeline(cfg: config_lib.RunConfig, for_kubeflow: bool = False,
                    schema_file: Optional[str] = None, image: Optional[str] = None) -> tfx.dsl.Pipeline:
    """The daily DAG for cfg.date; see the module docstring for `for_kubeflow`. `schema_file`
    replaces cfg.schema_path (on Kubeflow: the schema baked into the pipeline image); `image` is
    the pipeline image, which Vertex worker pools run (cfg.trainer_workers > 1)."""
    span = span_of(cfg.date)
    if for_kubeflow:
        date = tfx.dsl.experimental.RuntimeParameter(name="date", ptype=str)
        # Part of AvcExampleGen's cache key: a changed log file is ingested again. On Kubeflow the
        # date is known only at run time, so a task computes it then (components/input_fingerprint.py),
        # and with it previous_user_state's: D-1's input fingerprint and registered state.
        input_fingerprint = DayInputFingerprint(
            input_base=cfg.data_dir, date=date, cache_file=cfg.fingerprint_cache_path,
            registry_dir=registry_dir_of(cfg.home_dir)).with_id(INPUT_FINGERPRINT_ID)
        previous_state = RegisteredUserState(
            registry_dir=registry_dir_of(cfg.home_dir), date=date,
            previous_day=input_fingerprint.outputs["previous_day"].future()[0].value)
    else:
        date = cfg.date.isoformat()
        previous = span_of(cfg.previous_date)  # the day before, or before the skipped days
        previous_state = tfx.dsl.Resolver(
            strategy_class=SpanWindowStrategy,
            config={"first_span": previous, "last_span": previous, "min_spans": 0, "window_name": "user state"},
            user_state=tfx.dsl.Channel(type=UserState, producer_component_id="AvcExampleGen", output_key="user_state"))
    previous_state = previous_state.with_id("previous_user_state")
    example_gen = AvcExampleGen(
        input_base=cfg.data_dir, date=date,
        previous_user_state=previous_state.outputs["user_state"],
        max_bad_row_fraction=cfg.max_bad_row_fraction,
        input_fingerprint=input_fingerprint.outputs["fingerprint"].future()[0].value if for_kubeflow
        else impression_logs.day_fingerprint(cfg.data_dir, cfg.date, cfg.fingerprint_cache_path),
        quarantine_dir=quarantine_dir_of(cfg.home_dir))
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = tfx.components.ImportSchemaGen(schema_file=schema_file or cfg.schema_path)
    example_validator = tfx.components.ExampleValidator(
        statistics=statistics_gen.outputs["statistics"], schema=schema_gen.outputs["schema"])
    anomalies_gate = SchemaAnomaliesGate(anomalies=example_validator.outputs["anomalies"])
    components: List = [previous_state, example_gen, statistics_gen, schema_gen, example_validator, anomalies_gate]
    if for_kubeflow:
        components.insert(0, input_fingerprint)

    if not cfg.ingest_only:
        from models import preprocessing  # here: tf.Transform is slow to import for commands that build no pipeline

        analysis_fingerprint = preprocessing.analysis_fingerprint()
        if for_kubeflow:
            training_window = SpanWindowExamples(
                examples=example_gen.outputs["examples"], user_state=example_gen.outputs["user_state"],
                registry_dir=registry_dir_of(cfg.home_dir),
                train_days=cfg.train_days, min_spans=cfg.min_train_days).with_id("training_window")
            training_window.add_upstream_node(anomalies_gate)  # register only a validated span
            window_examples = training_window.outputs["window"]
            baseline = tfx.dsl.Resolver(
                strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
                model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
                model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing),
            ).with_id("baseline_model")
            analyzer_cache = None
        else:
            training_window = tfx.dsl.Resolver(
                strategy_class=SpanWindowStrategy,
                config={"first_span": span_of(cfg.train_dates[0]), "last_span": span - 1,
                        "min_spans": cfg.min_train_days, "window_name": "training window",
                        "skipped_spans": sorted(span_of(d) for d in cfg.skipped_dates)},
                # Only AvcExampleGen's spans and ExampleValidator's verdicts, from every earlier run.
                examples=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Examples,
                                         producer_component_id=example_gen.id, output_key="examples"),
                anomalies=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ExampleAnomalies,
                                          producer_component_id=example_validator.id, output_key="anomalies"),
            ).with_id("training_window")
            window_examples = training_window.outputs["examples"]
            # The model blessed on an earlier day: the Evaluator's baseline and the warm start.
            # Not "the latest blessed model": that changes with this very run's push, so a rerun
            # of the day would not find its Evaluator cached (see BaselineModelStrategy).
            baseline = tfx.dsl.Resolver(
                strategy_class=BaselineModelStrategy,
                config={"evaluation_span": span},
                model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model,
                                      producer_component_id="Trainer", output_key="model"),
                model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing,
                                               producer_component_id="BlessingGate", output_key="blessing"),
            ).with_id("baseline_model")
            # tf.Transform's per-span analyzer results from an earlier day's window: only the new
            # span is read and analyzed; tf.Transform merges the per-span accumulators (see EarlierWindowCacheStrategy).
            analyzer_cache = tfx.dsl.Resolver(
                strategy_class=EarlierWindowCacheStrategy,
                config={"window_last_span": span - 1, "analysis_fingerprint": analysis_fingerprint},
                cache=tfx.dsl.Channel(type=tfx.types.standard_artifacts.TransformCache,
                                      producer_component_id="Transform", output_key="updated_analyzer_cache"),
            ).with_id("analyzer_cache")
        transform = tfx.components.Transform(
            examples=window_examples,
            schema=schema_gen.outputs["schema"],
            preprocessing_fn="models.preprocessing.preprocessing_fn",
            splits_config=tfx.proto.SplitsConfig(analyze=[SPLIT]),
            # StatisticsGen already describes every day; Transform's own pre- and
            # post-transform statistics of the whole window were the run's largest memory peak.
            disable_statistics=True,
            materialize=False,
            # Part of Transform's cache key, and only caches written by the same code are reused.
            custom_config={"analysis_fingerprint": analysis_fingerprint},
            analyzer_cache=analyzer_cache.outputs["cache"] if analyzer_cache else None,
            disable_analyzer_cache=analyzer_cache is None)
        transform.add_upstream_node(anomalies_gate)
        trainer_class, trainer_config = _trainer(cfg, for_kubeflow, image)
        trainer = trainer_class(
            run_fn="models.trainer.run_fn",
            examples=window_examples,
            transform_graph=transform.outputs["transform_graph"],
            schema=schema_gen.outputs["schema"],
            base_model=baseline.outputs["model"] if cfg.warm_start else None,
            train_args=tfx.proto.TrainArgs(splits=[SPLIT], num_steps=cfg.train_steps),
            eval_args=tfx.proto.EvalArgs(splits=[SPLIT], num_steps=cfg.eval_steps),
            custom_config={"variant": cfg.variant, "batch_size": cfg.batch_size, "epochs": cfg.epochs,
                           "overrides": dict(cfg.model_overrides), **trainer_config})
        # TFX's Evaluator's inputs and output (a TFMA-format ModelEvaluation), scored in batches
        # (components/batch_evaluator.py); the id stays "Evaluator" for lineage, gc and reports.
        evaluator = BatchEvaluator(
            examples=example_gen.outputs["examples"],
            model=trainer.outputs["model"],
            baseline_model=baseline.outputs["model"],
            example_splits=[SPLIT],
            eval_config=evaluation.make_eval_config()).with_id("Evaluator")
        blessing_gate = BlessingGate(
            examples=example_gen.outputs["examples"], evaluation=evaluator.outputs["evaluation"],
            model=trainer.outputs["model"], baseline_model=baseline.outputs["model"],
            thresholds=evaluation.blessing_thresholds())
        infra_validator = ServingInfraValidator(
            model=trainer.outputs["model"], examples=example_gen.outputs["examples"],
            model_name=config_lib.MODEL_NAME, num_requests=cfg.infra_validation_requests)
        # One version per day, safe against a kill at any point (components/exactly_once_pusher.py).
        pusher = ExactlyOncePusher(
            model_blessing=blessing_gate.outputs["blessing"],
            infra_blessing=infra_validator.outputs["blessing"],
            examples=example_gen.outputs["examples"],
            base_directory=cfg.serving_model_dir, pin_path=cfg.pin_path).with_id("Pusher")
        config_writer = ServingConfigWriter(
            pushed_model=pusher.outputs["pushed_model"], models_config_path=cfg.models_config_path,
            model_name=config_lib.MODEL_NAME, base_path=cfg.serving_model_dir, pin_path=cfg.pin_path)
        components += [training_window] + ([analyzer_cache] if analyzer_cache else [])
        components += [transform, baseline, trainer, evaluator, blessing_gate, infra_validator, pusher, config_writer]

    for component in components:
        beam_args = cfg.component_beam_args(component.id)
        if beam_args:
            component.with_beam_pipeline_args(beam_args)
    return tfx.dsl.Pipeline(
        pipeline_name=config_lib.KUBEFLOW_PIPELINE_NAME if for_kubeflow else config_lib.PIPELINE_NAME,
        pipeline_root=cfg.pipeline_root,
        components=components,
        enable_cache=cfg.enable_cache,
        metadata_connection_config=None if for_kubeflow else metadata_connection(cfg),
        beam_pipeline_args=cfg.beam_pipeline_args(
            config_lib.KUBEFLOW_PROJECT_DIR if for_kubeflow else config_lib.PROJECT_DIR))


def _trainer(cfg: config_lib.RunConfig, for_kubeflow: bool, image: Optional[str]):
    """(Trainer class, its extra custom_config): TFX's own Trainer, or on Kubeflow/Vertex with
    cfg.trainer_workers > 1 the Vertex AI Trainer extension with a chief and worker pools (Vertex
    sets TF_CONFIG on each replica; models.trainer picks MultiWorkerMirroredStrategy from it)."""
    if cfg.trainer_workers <= 1:
        return tfx.components.Trainer, {}
    if not for_kubeflow:
        raise ValueError("trainer_workers > 1 is for compile-kubeflow (Vertex AI worker pools); locally, "
                         "start the workers yourself with TF_CONFIG set")
    if not cfg.vertex_project or not image:
        raise ValueError("trainer_workers > 1 needs vertex_project (--vertex-project) and the pipeline image "
                         "for the Vertex custom job")
    from tfx.extensions.google_cloud_ai_platform import constants as vertex
    from tfx.extensions.google_cloud_ai_platform.trainer import component as vertex_trainer
    from tfx.extensions.google_cloud_ai_platform.trainer import executor as vertex_executor

    def pool(replicas: int) -> Dict[str, object]:
        return {"machine_spec": {"machine_type": cfg.trainer_machine_type}, "replica_count": replicas,
                "container_spec": {"image_uri": image}}

    return vertex_trainer.Trainer, {
        vertex.ENABLE_VERTEX_KEY: True,
        vertex.VERTEX_REGION_KEY: cfg.vertex_region,
        vertex_executor.TRAINING_ARGS_KEY: {
            "project": cfg.vertex_project,
            "worker_pool_specs": [pool(1), pool(cfg.trainer_workers - 1)]},
    }


def metadata_connection(cfg: config_lib.RunConfig):
    """sqlite under --home by default (the embedded store); MySQL when configured."""
    if cfg.metadata_mysql:
        return tfx.orchestration.metadata.mysql_metadata_connection_config(**cfg.metadata_mysql)
    return tfx.orchestration.metadata.sqlite_metadata_connection_config(cfg.metadata_path)
