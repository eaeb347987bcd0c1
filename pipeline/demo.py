"""`poso demo`: the whole product on built-in synthetic data, start to finish, on one machine.

1. writes 8 days of synthetic impression logs in the KuaiRand log schema;
2. runs the daily TFX pipeline for the 8th day (ingesting the 7 days before it first);
3. starts the TF Serving-API server on 127.0.0.1 on the pushed model;
4. sends one gRPC and one REST predict request in TF Serving's formats, prints per-task scores;
5. stops the server and prints where the artifacts are.
"""

from __future__ import annotations

import datetime
import os
import shutil
import time

from feature_specs import specs
from pipeline import config as config_lib
from pipeline import exit_codes, home_lock, operation

START = datetime.date(2022, 4, 8)   # KuaiRand's logs start on 2022-04-08
DAYS = config_lib.TRAIN_DAYS + 1
SEED = 42
_MARKER = ".poso-demo"


# Kept when the workspace is recreated: the lock this demo holds and the command logs.
_KEPT = (home_lock.LOCK_FILE, "logs")


def _fresh_home(home: str) -> None:
    """Recreates the demo workspace; refuses to delete a folder the demo did not create."""
    os.makedirs(home, exist_ok=True)
    entries = [e for e in os.listdir(home) if e not in _KEPT]
    if entries and _MARKER not in entries:
        raise operation.BadInput(f"--home {home} exists and was not made by `poso demo`; pass another --home")
    for entry in entries:
        path = os.path.join(home, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    open(os.path.join(home, _MARKER), "w").close()


def run_demo(home: str, rows_per_day: int, train_steps: int, verbose: bool = False,
             beam_mode: str = "in_memory", variant: str = config_lib.DEFAULT_VARIANT) -> int:
    from components import synthetic_logs
    from components.infra_validator import sample_request_examples
    from pipeline import local_runner, report, summary
    from serving import client, instances, server

    started = time.time()
    local_runner.setup_logging(verbose)
    home = os.path.abspath(home)
    _fresh_home(home)
    data = os.path.join(home, "data")
    print(f"[1/4] Writing {DAYS} days x {rows_per_day} synthetic impressions to {data}", flush=True)
    synthetic_logs.generate(data, START, DAYS, seed=SEED, impressions_per_day=rows_per_day)

    date = START + datetime.timedelta(days=DAYS - 1)
    cfg = config_lib.RunConfig(date=date, data_dir=data, home=home, train_steps=train_steps,
                               beam_direct_running_mode=beam_mode, variant=variant)
    print(f"[2/4] Daily TFX run of model {variant} (LocalDagRunner, metadata in {cfg.metadata_path})", flush=True)
    result = local_runner.run_day(cfg)
    print(summary.format_summary(result), flush=True)
    summary.write_summary(result, home)
    report_path = report.write_report(result, home)
    if not result["pushed"]:
        print("The model was not pushed, so there is nothing to serve; see the reasons above.")
        return exit_codes.NOT_BLESSED

    print(f"[3/4] Serving {cfg.models_config_path} on 127.0.0.1", flush=True)
    handle = server.start_in_background(model_config_file=cfg.models_config_path, host=config_lib.SERVING_HOST,
                                        grpc_port=0, rest_port=0)
    try:
        examples = _eval_examples(result["eval_examples_uri"])
        requests = sample_request_examples(examples, 3)
        grpc_address = f"{config_lib.SERVING_HOST}:{handle.grpc_port}"
        rest_url = f"http://{config_lib.SERVING_HOST}:{handle.rest_port}"
        print(f"[4/4] gRPC Predict to {grpc_address} (serialized tf.Examples, signature "
              f"{instances.EXAMPLES_SIGNATURE}) and REST POST {rest_url}/v1/models/{config_lib.MODEL_NAME}:predict "
              f"(raw features, signature {instances.RAW_SIGNATURE})", flush=True)
        by_grpc = client.predict_grpc(grpc_address, config_lib.MODEL_NAME, examples=requests,
                                      signature_name=instances.EXAMPLES_SIGNATURE)
        by_rest = client.predict_rest(rest_url, config_lib.MODEL_NAME, instances=instances.raw_instances(requests),
                                      signature_name=instances.RAW_SIGNATURE)
    finally:
        handle.stop()
    tasks = [t.name for t in specs.TASKS]
    print("  row  " + " ".join(f"{'gRPC ' + t:>16s}" for t in tasks) + "  | " +
          " ".join(f"{'REST ' + t:>16s}" for t in tasks))
    for row in range(len(requests)):
        print(f"  {row:3d}  " + " ".join(f"{float(by_grpc[t][row]):16.4f}" for t in tasks) + "  | " +
              " ".join(f"{float(by_rest[t][row]):16.4f}" for t in tasks))
    print(f"\nDone in {time.time() - started:.0f} s. Artifacts:\n"
          f"  logs:              {data}\n  pipeline root:     {cfg.pipeline_root}\n"
          f"  metadata (sqlite): {cfg.metadata_path}\n  served model:      {result['pushed_destination']}\n"
          f"  models.config:     {cfg.models_config_path}\n  run report:        {report_path}\n"
          f"Serve it again: bin/poso serve --model-config {cfg.models_config_path}")
    return exit_codes.PUSHED


def _eval_examples(uri: str):
    from tfx.types import artifact_utils, standard_artifacts

    from components.avc_example_gen import SPLIT

    artifact = standard_artifacts.Examples()
    artifact.uri = uri
    artifact.split_names = artifact_utils.encode_split_names([SPLIT])
    return artifact
