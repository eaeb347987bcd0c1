"""Kubeflow Pipelines v2 / Vertex AI Pipelines: compile the daily pipeline to a PipelineJob JSON spec.

    bin/poso compile-kubeflow --image REGISTRY/poso-ranking-pipeline:TAG \
        --home /gcs/BUCKET/home --data /gcs/BUCKET/data --output poso_ranking_pipeline.json

The spec is `create_pipeline(cfg, for_kubeflow=True)` (the same DAG as the local runner; see
pipeline/pipeline.py for the resolvers KFP v2 cannot compile and what replaces them) compiled
by TFX's KubeflowV2DagRunner. Every component runs in the pipeline image (Dockerfile) through
TFX's container entrypoint `python -m tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor`.
The run date is the required runtime parameter `date` (YYYY-MM-DD, or before:YYYY-MM-DD for the
day before); `poso schedule --kind kubeflow` writes the daily recurring run, which sets it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Dict

from tfx import v1 as tfx

from pipeline import config as config_lib
from pipeline import pipeline as pipeline_lib

# The runtime parameter `date` of the daily recurring run: the day before the scheduled day, as
# the KFP scheduler substitutes [[ScheduledTime.<Go time layout>]] (see avc_example_gen.run_date).
# It has no default: KFP caches a task by its inputs, so a constant such as "yesterday" would
# find the first day's AvcExampleGen cached on every later day.
RECURRING_DATE_PARAMETER = "before:[[ScheduledTime.2006-01-02]]"


def compile_pipeline(cfg: config_lib.RunConfig, image: str, output_path: str,
                     schema_file: str = config_lib.KUBEFLOW_SCHEMA_FILE) -> Dict[str, object]:
    """Writes the PipelineJob JSON to `output_path` and returns it as a dict.

    cfg.home and cfg.data_dir are the paths the containers use (remote or mounted storage);
    cfg.date is not used: the date is the runtime parameter `date`."""
    if not image:
        raise ValueError("compile-kubeflow: --image (the pipeline image built from the Dockerfile) is required")
    runner = tfx.orchestration.experimental.KubeflowV2DagRunner(
        config=tfx.orchestration.experimental.KubeflowV2DagRunnerConfig(
            display_name=config_lib.KUBEFLOW_PIPELINE_NAME, default_image=image),
        output_dir=os.path.dirname(os.path.abspath(output_path)),
        output_filename=os.path.basename(output_path))
    spec = runner.run(pipeline_lib.create_pipeline(cfg, for_kubeflow=True, schema_file=schema_file, image=image),
                      write_out=False)
    _wire_input_fingerprint(spec["pipelineSpec"]["root"]["dag"]["tasks"])
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with open(output_path, "w") as f:
        json.dump(spec, f, sort_keys=True)  # as KubeflowV2DagRunner writes it
    return spec


def _wire_input_fingerprint(tasks: Dict[str, dict]) -> None:
    """Two fixes to TFX's compiled tasks for the input fingerprint (components/input_fingerprint.py):
    - its task is never taken from KFP's cache (`cachingOptions` without enableCache, what KFP's
      `task.set_caching_options(False)` compiles to): its inputs stay the same when a file changes;
    - TFX 1.21's step_builder names the producer of a task output parameter `<node id>_task`,
      a task that does not exist (its own golden file has the same): the node id it is."""
    tasks[pipeline_lib.INPUT_FINGERPRINT_ID]["cachingOptions"] = {}
    for task in tasks.values():
        for parameter in task.get("inputs", {}).get("parameters", {}).values():
            producer = parameter.get("taskOutputParameter", {})
            name = producer.get("producerTask", "")
            if name not in tasks and name.endswith("_task") and name[:-len("_task")] in tasks:
                producer["producerTask"] = name[:-len("_task")]


def run(args) -> int:
    from pipeline import cli

    if args.trainer_workers < 1:
        raise SystemExit("compile-kubeflow: --trainer-workers must be at least 1")
    cfg = dataclasses.replace(cli._run_config(args, datetime.date.today()), trainer_workers=args.trainer_workers,
                              trainer_machine_type=args.trainer_machine_type, vertex_project=args.vertex_project,
                              vertex_region=args.vertex_region)
    spec = compile_pipeline(cfg, args.image, args.output, args.schema_file)
    tasks = spec["pipelineSpec"]["root"]["dag"]["tasks"]
    print(f"wrote {args.output}: {len(tasks)} tasks, image {args.image}, pipeline root {cfg.pipeline_root}")
    print("upload it with `kfp pipeline create -p poso_ranking " + args.output + "` (Kubeflow) or submit it "
          "with google.cloud.aiplatform.PipelineJob(template_path=...) (Vertex); schedule it with "
          "`poso schedule --kind kubeflow`")
    return 0
