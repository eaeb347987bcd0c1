"""Kubeflow Pipelines v2 / Vertex: the compiled spec, the span registry that replaces the custom
resolvers there, and the recurring run. Compile only: no Kubeflow cluster is available here."""

import datetime
import inspect
import json
import os
import shlex

import pytest
from tfx.types import artifact_utils, standard_artifacts

from components import avc_example_gen, span_registry
from components.avc_example_gen import SPLIT, span_of
from components.span_window import WindowError
from feature_specs import specs
from pipeline import cli, config as config_lib, kubeflow_v2_runner, schedule
from pipeline import pipeline as pipeline_lib

IMAGE = "registry.example/poso/pipeline:test"
HOME, DATA = "/gcs/bucket/home", "/gcs/bucket/data"
BEAM = ["--runner=FlinkRunner", "--flink_master=flink:8081"]
BEAM_COMPONENTS = ("AvcExampleGen", "StatisticsGen", "Transform")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("kfp") / "pipeline.json"
    argv = ["compile-kubeflow", "--image", IMAGE, "--home", HOME, "--data", DATA, "--output", str(out),
            "--train-steps", "123"] + [f"--beam-arg={a}" for a in BEAM]
    assert cli.main(argv) == 0
    with open(out) as f:
        return json.load(f), str(out)


def _local_node_ids():
    cfg = config_lib.RunConfig(date=datetime.date(2022, 4, 15), home="/tmp/unused-home")
    return [node.id for node in pipeline_lib.create_pipeline(cfg).components]


def test_every_component_of_the_local_dag_is_a_task(compiled):
    spec, _ = compiled
    tasks = spec["pipelineSpec"]["root"]["dag"]["tasks"]
    # The analyzer cache helps only the local runner (the Kubeflow window is one new artifact a day).
    for node_id in [n for n in _local_node_ids() if n != "analyzer_cache"]:
        # TFX splits a latest-blessed-model resolver into two KFP tasks named after it.
        assert node_id in tasks or any(t.startswith(node_id + "-") for t in tasks), (node_id, sorted(tasks))
    depends = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    assert "SchemaAnomaliesGate" in depends["training_window"]   # only validated days enter the window
    assert "training_window" in depends["Transform"] and "training_window" in depends["Trainer"]
    assert "previous_user_state" in depends["AvcExampleGen"]
    assert "analyzer_cache" in _local_node_ids() and not any(t.startswith("analyzer_cache") for t in tasks)


def test_every_executor_runs_the_image_through_the_tfx_entrypoint_with_the_beam_args(compiled):
    spec, _ = compiled
    executors = spec["pipelineSpec"]["deploymentSpec"]["executors"]
    containers = {name: e["container"] for name, e in executors.items() if "container" in e}
    assert len(containers) >= 12
    for name, container in containers.items():
        assert container["image"] == IMAGE, name
        assert container["command"] == list(kubeflow_v2_runner.tfx.orchestration.experimental
                                             .KubeflowV2DagRunnerConfig().default_commands), name
    for component in BEAM_COMPONENTS:
        args = containers[f"{component}_executor"]["args"]
        assert all(a in args for a in BEAM), (component, args)
        # A remote runner gets the project from setup.py inside the image.
        assert f"--setup_file={config_lib.KUBEFLOW_PROJECT_DIR}/setup.py" in args
    custom = {"AvcExampleGen": "components.avc_example_gen.Executor",
              "training_window": "components.span_registry.SpanWindowExamplesExecutor",
              "previous_user_state": "components.span_registry.RegisteredUserStateExecutor"}
    for component, executor_class in custom.items():
        args = containers[f"{component}_executor"]["args"]
        assert args[args.index("--executor_class_path") + 1] == executor_class


def test_the_date_is_a_required_runtime_parameter_and_paths_are_remote(compiled):
    spec, _ = compiled
    root = spec["pipelineSpec"]["root"]
    assert root["inputDefinitions"]["parameters"]["date"] == {"type": "STRING"}
    assert "date" not in spec["runtimeConfig"].get("parameters", {})  # no default: see kubeflow_v2_runner
    tasks = root["dag"]["tasks"]
    for task in ("AvcExampleGen", "previous_user_state"):
        assert tasks[task]["inputs"]["parameters"]["date"] == {"componentInputParameter": "date"}
    text = json.dumps(spec)
    assert f'"{DATA}"' in text
    assert span_registry.registry_dir_of(HOME) in text
    assert os.path.join(HOME, "serving", config_lib.MODEL_NAME) in text      # Pusher's base directory
    assert spec["runtimeConfig"]["gcsOutputDirectory"] == os.path.join(HOME, "pipeline_root")
    assert config_lib.KUBEFLOW_SCHEMA_FILE in text
    train_args = tasks["Trainer"]["inputs"]["parameters"]["train_args"]["runtimeValue"]["constantValue"]["stringValue"]
    assert json.loads(train_args) == {"num_steps": 123, "splits": [SPLIT]}


def test_run_date_forms():
    assert avc_example_gen.run_date("2022-04-15") == datetime.date(2022, 4, 15)
    assert avc_example_gen.run_date("before:2022-03-01") == datetime.date(2022, 2, 28)
    today = datetime.datetime.now(specs.LOG_TIMEZONE).date()
    assert avc_example_gen.run_date("yesterday") in (today - datetime.timedelta(days=1), today)
    with pytest.raises(ValueError, match="'2022-13-01'"):
        avc_example_gen.run_date("2022-13-01")


def _span_dir(root, name, files):
    path = os.path.join(root, name)
    os.makedirs(path)
    for file_name, text in files.items():
        with open(os.path.join(path, file_name), "w") as f:
            f.write(text)
    return path


def _examples(root, span, text):
    """An Examples artifact of `span` whose split holds one file containing `text`."""
    _span_dir(root, f"examples-{span}/Split-{SPLIT}", {"part-0.gz": text})
    return _artifact(standard_artifacts.Examples, os.path.join(root, f"examples-{span}"), span)


def _artifact(cls, uri, span=None):
    artifact = cls()
    artifact.uri = uri
    if span is not None:
        artifact.span = span
    return artifact


def _window(registry, examples, state, out, train_days=3, min_spans=3):
    window = _artifact(standard_artifacts.Examples, out)
    span_registry.SpanWindowExamplesExecutor().Do(
        {"examples": [examples], "user_state": [state]}, {"window": [window]},
        {"registry_dir": registry, "train_days": train_days, "min_spans": min_spans})
    return window


def test_span_registry_carries_the_state_and_the_window_of_validated_days(tmp_path):
    registry = str(tmp_path / "registry")
    day = datetime.date(2022, 4, 10)
    # Days 1..3 registered as their runs would have: examples of span s hold one file named after s.
    for offset in range(3):
        span = span_of(day) + offset
        examples = _examples(str(tmp_path), span, f"examples {span}")
        state = _artifact(avc_example_gen.UserState, _span_dir(tmp_path, f"st{span}", {"state-0": f"state {span}"}), span)
        span_registry.register_day(registry, span, examples.uri, state.uri)
    today = span_of(day) + 3

    # The state through the day before, copied for AvcExampleGen.
    out_state = _artifact(avc_example_gen.UserState, str(tmp_path / "out_state"))
    span_registry.RegisteredUserStateExecutor().Do(
        {}, {"user_state": [out_state]}, {"registry_dir": registry, "date": f"before:{(day + datetime.timedelta(days=4)).isoformat()}"})
    assert out_state.span == today - 1 and out_state.through_date == "2022-04-12"
    assert open(os.path.join(out_state.uri, "state-0")).read() == f"state {today - 1}"

    # The window of the 3 days before today, in one Examples artifact; today gets registered.
    today_examples = _examples(str(tmp_path), today, "today")
    today_state = _artifact(avc_example_gen.UserState, _span_dir(tmp_path, f"st{today}", {"state-0": "today"}), today)
    window = _window(registry, today_examples, today_state, str(tmp_path / "window"))
    files = sorted(os.listdir(os.path.join(window.uri, f"Split-{SPLIT}")))
    assert [open(os.path.join(window.uri, f"Split-{SPLIT}", f)).read() for f in files] == \
        [f"examples {s}" for s in range(today - 3, today)]
    assert artifact_utils.decode_split_names(window.split_names) == [SPLIT]
    assert set(span_registry.registered_days(registry, today, today)) == {today}

    # A gap in the registry: refused, naming the missing date.
    os.remove(os.path.join(registry, f"span-{today - 2}.json"))
    with pytest.raises(WindowError, match="missing: 2022-04-11"):
        _window(registry, today_examples, today_state, str(tmp_path / "window2"))

    # No state registered for the day before: span -1, so AvcExampleGen decides (first day or refuse).
    empty = _artifact(avc_example_gen.UserState, str(tmp_path / "empty_state"))
    span_registry.RegisteredUserStateExecutor().Do(
        {}, {"user_state": [empty]}, {"registry_dir": registry, "date": "2022-04-12"})
    assert empty.span == -1


def test_recurring_run_spec_is_what_kfp_accepts(compiled, tmp_path, capsys):
    _, package = compiled
    out = tmp_path / "recurring.json"
    assert cli.main(["schedule", "--kind", "kubeflow", "--pipeline-package", package, "--output", str(out),
                     "--at", "04:05"]) == 0
    spec = json.loads(out.read_text())
    import kfp
    from kfp.cli import recurring_run

    accepted = set(inspect.signature(kfp.Client.create_recurring_run).parameters) - {"self"}
    assert set(spec) - {"experiment_name"} <= accepted
    assert spec["cron_expression"] == "0 5 4 * * *" and spec["max_concurrency"] == 1
    assert spec["params"] == {"date": kubeflow_v2_runner.RECURRING_DATE_PARAMETER}
    # The printed command parses with kfp's own CLI (parsing only: no cluster here).
    command = capsys.readouterr().out.strip().splitlines()[-1]
    argv = shlex.split(command)
    assert argv[:3] == ["kfp", "recurring-run", "create"]
    context = recurring_run.create.make_context("create", argv[3:])
    assert context.params["cron_expression"] == spec["cron_expression"]
    assert context.params["pipeline_package_path"] == spec["pipeline_package_path"]
    assert context.params["args"] == (f"date={kubeflow_v2_runner.RECURRING_DATE_PARAMETER}",)


def test_schedule_refuses_a_missing_pipeline_package(tmp_path):
    with pytest.raises(SystemExit, match="compile-kubeflow"):
        cli.main(["schedule", "--kind", "kubeflow", "--pipeline-package", str(tmp_path / "nope.json")])


def _run_compiled_executor(spec, task, parameters, output_artifacts, tmp_path, output_parameters=()):
    """What a KFP v2 pod does for `task`: TFX's entrypoint with the compiled args, on an
    ExecutorInput built from the spec (in this process: TFX is imported already). Returns the
    executor output (JSON) and the output types."""
    from tfx.orchestration.kubeflow.v2.container import kubeflow_v2_run_executor

    pipeline_spec = spec["pipelineSpec"]
    container = pipeline_spec["deploymentSpec"]["executors"][f"{task}_executor"]["container"]
    types = {name: definition["artifactType"] for name, definition in
             pipeline_spec["components"][task]["outputDefinitions"]["artifacts"].items()}
    invocation = {
        "inputs": {"parameterValues": parameters, "parameters": {k: {"stringValue": v} for k, v in parameters.items()}},
        "outputs": {"artifacts": {name: {"artifacts": [{
            "uri": uri, "name": f"projects/1/locations/l/metadataStores/default/artifacts/{number}",
            "type": types[name]}]} for number, (name, uri) in enumerate(sorted(output_artifacts.items()))},
            "parameters": {name: {"outputFile": str(tmp_path / f"{name}.parameter")} for name in output_parameters},
            "outputFile": str(tmp_path / "executor_output.json")}}
    assert container["command"][1:] == ["-m", kubeflow_v2_run_executor.__name__]
    args = [a if a != "{{$}}" else json.dumps(invocation) for a in container["args"]]
    kubeflow_v2_run_executor.main(kubeflow_v2_run_executor._parse_flags(args))
    return json.loads((tmp_path / "executor_output.json").read_text()), types


def test_tfx_container_entrypoint_runs_a_compiled_custom_component(compiled, tmp_path):
    """`previous_user_state` as a pod runs it; the custom artifact type survives the round trip."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2
    from tfx.orchestration.kubeflow.v2.container import kubeflow_v2_entrypoint_utils

    spec, _ = compiled
    registry, state_dir = str(tmp_path / "registry"), _span_dir(tmp_path, "state", {"state-0": "carried"})
    span = span_of(datetime.date(2022, 4, 11))
    span_registry.register_day(registry, span, str(tmp_path / "examples"), state_dir)
    executor_output, types = _run_compiled_executor(
        spec, "previous_user_state", {"registry_dir": registry, "date": "before:2022-04-13"},
        {"user_state": str(tmp_path / "out")}, tmp_path)

    output = executor_output["artifacts"]["user_state"]
    output["artifacts"][0]["type"] = types["user_state"]
    parsed = kubeflow_v2_entrypoint_utils.parse_raw_artifact_dict(
        {"user_state": json_format.ParseDict(output, pipeline_spec_pb2.ArtifactList())}, {})
    state = parsed["user_state"][0]
    assert isinstance(state, avc_example_gen.UserState)
    assert (state.span, state.through_date) == (span, "2022-04-11")
    assert open(os.path.join(state.uri, "state-0")).read() == "carried"


def _fingerprint_outputs(folder):
    return {name: str(folder / name / "value") for name in ("fingerprint", "previous_day")}


def _fingerprint_artifacts(folder):
    from tfx.types import standard_artifacts as artifacts

    outputs = {}
    for name, uri in _fingerprint_outputs(folder).items():
        outputs[name] = [artifacts.String()]
        outputs[name][0].uri = uri
    return outputs


def test_the_input_fingerprint_is_computed_at_run_time_and_keys_the_ingest_cache(compiled, tmp_path):
    """As locally, AvcExampleGen's cache key holds the day's input fingerprint: on Kubeflow an
    uncached task computes it when the run starts and passes it as a task output parameter (KFP's
    cache key holds parameter values), so a changed log file is ingested again."""
    from components import impression_logs, input_fingerprint

    spec, _ = compiled
    tasks = spec["pipelineSpec"]["root"]["dag"]["tasks"]
    task = pipeline_lib.INPUT_FINGERPRINT_ID
    assert tasks[task]["cachingOptions"] == {}      # what KFP's set_caching_options(False) compiles to
    assert all(tasks[t]["cachingOptions"] == {"enableCache": True} for t in ("AvcExampleGen", "StatisticsGen", "Trainer"))
    assert tasks[task]["inputs"]["parameters"]["date"] == {"componentInputParameter": "date"}
    ingest = tasks["AvcExampleGen"]
    assert ingest["inputs"]["parameters"]["input_fingerprint"] == {
        "taskOutputParameter": {"producerTask": task, "outputParameterKey": "fingerprint"}}
    assert task in ingest["dependentTasks"]
    outputs = spec["pipelineSpec"]["components"][task]["outputDefinitions"]
    assert outputs["parameters"]["fingerprint"] == {"parameterType": "STRING"}
    # Every task output parameter names a task that exists (TFX 1.21 names `<id>_task`).
    producers = [p["taskOutputParameter"]["producerTask"] for t in tasks.values()
                 for p in t.get("inputs", {}).get("parameters", {}).values() if "taskOutputParameter" in p]
    assert producers and set(producers) <= set(tasks)

    # The compiled task as a pod runs it: the fingerprint of the day before the scheduled date.
    day = datetime.date(2022, 4, 12)
    log = tmp_path / "data" / "logs" / day.isoformat() / "part-0.csv"
    log.parent.mkdir(parents=True)
    log.write_text("user_id,video_id\n1,2\n")
    parameters = {"input_base": str(tmp_path / "data"), "date": "before:2022-04-13",
                  "cache_file": str(tmp_path / "home" / "input_fingerprints.json")}
    executor_output, _ = _run_compiled_executor(spec, task, parameters, _fingerprint_outputs(tmp_path / "fp"),
                                                tmp_path, output_parameters=["fingerprint", "previous_day"])
    value = executor_output["parameterValues"]["fingerprint"]
    assert value == impression_logs.day_fingerprint(str(tmp_path / "data"), day) and "part-0.csv:" in value

    # A corrected file (same name and size) gives another value, so AvcExampleGen is not cached.
    log.write_text("user_id,video_id\n1,3\n")
    outputs = _fingerprint_artifacts(tmp_path / "fp2")
    input_fingerprint.DayInputFingerprintExecutor().Do({}, outputs, parameters)
    changed = outputs["fingerprint"][0]
    assert changed.read() not in ("", value) and changed.read() == impression_logs.day_fingerprint(
        str(tmp_path / "data"), day)


def test_previous_user_state_is_cached_on_the_day_befores_input_and_registered_state(compiled, tmp_path):
    """As locally (where a changed file of day D-1 is ingested again and D starts from that
    ingest's state), a corrected D-1 file never leaves day D on the state ingested from the old
    one: previous_user_state's cache key holds D-1's input fingerprint and registry entry, from the
    uncached fingerprint task; with the file changed it refuses the registered state, and once D-1
    is run again (or re-registered because a day before it changed) it carries the new one."""
    from components import impression_logs

    spec, _ = compiled
    tasks = spec["pipelineSpec"]["root"]["dag"]["tasks"]
    previous, task = tasks["previous_user_state"], pipeline_lib.INPUT_FINGERPRINT_ID
    assert previous["cachingOptions"] == {"enableCache": True}
    assert previous["inputs"]["parameters"]["previous_day"] == {
        "taskOutputParameter": {"producerTask": task, "outputParameterKey": "previous_day"}}
    assert task in previous["dependentTasks"]
    assert tasks[task]["inputs"]["parameters"]["registry_dir"]["runtimeValue"]["constantValue"]["stringValue"] == \
        span_registry.registry_dir_of(HOME)

    day_before = datetime.date(2022, 4, 12)
    log = tmp_path / "data" / "logs" / day_before.isoformat() / "part-0.csv"
    log.parent.mkdir(parents=True)
    log.write_text("user_id,video_id\n1,2\n")
    registry = str(tmp_path / "registry")
    parameters = {"input_base": str(tmp_path / "data"), "date": "2022-04-13", "registry_dir": registry,
                  "cache_file": str(tmp_path / "home" / "input_fingerprints.json")}

    def key(name):   # the compiled fingerprint task as a pod runs it
        outputs, _ = _run_compiled_executor(spec, task, parameters, _fingerprint_outputs(tmp_path / name),
                                            tmp_path, output_parameters=["fingerprint", "previous_day"])
        return outputs["parameterValues"]["previous_day"]

    def carried(previous_day, name):
        state = _artifact(avc_example_gen.UserState, str(tmp_path / name))
        span_registry.RegisteredUserStateExecutor().Do({}, {"user_state": [state]}, {
            "registry_dir": registry, "date": "2022-04-13", "previous_day": previous_day})
        return open(os.path.join(state.uri, "state-0")).read()

    def ingest(state_text, name):   # what D-1's run registers (its training_window task)
        span_registry.register_day(registry, span_of(day_before), str(tmp_path / "examples"),
                                   _span_dir(tmp_path, name, {"state-0": state_text}),
                                   impression_logs.day_fingerprint(str(tmp_path / "data"), day_before))

    not_ingested = key("k0")
    ingest("from the first file", "state1")
    ingested = key("k1")
    assert ingested != not_ingested and key("k1-again") == ingested   # same files and state: cached
    assert carried(ingested, "out1") == "from the first file"

    log.write_text("user_id,video_id\n1,3\n")   # a corrected file of D-1, same name and size
    corrected = key("k2")
    assert corrected not in (ingested, not_ingested)
    with pytest.raises(span_registry.StaleUserStateError, match="2022-04-12 changed since it was ingested"):
        carried(corrected, "out2")

    ingest("from the corrected file", "state2")   # D-1 run again
    rerun = key("k3")
    assert rerun not in (ingested, corrected)
    assert carried(rerun, "out3") == "from the corrected file"

    ingest("after a correction of D-2", "state3")   # D-1's files unchanged, its state not
    assert key("k4") not in (ingested, corrected, rerun)
    log.unlink()   # D-1's logs deleted since (retention): not a change, as locally
    assert carried(key("k5"), "out5") == "after a correction of D-2"


def test_memory_bound_components_run_in_one_beam_process_on_direct_runner():
    """AvcExampleGen holds the day's data in every Beam worker process: on DirectRunner it runs in
    one, after (so over) the pipeline's multi-processing arguments. The Evaluator uses no Beam."""
    def beam_args(**overrides):
        cfg = config_lib.RunConfig(date=datetime.date(2022, 4, 15), home="/tmp/unused-home", **overrides)
        by_id = {node.id: node for node in pipeline_lib.create_pipeline(cfg).components}
        return {node_id: list(node.executor_spec.beam_pipeline_args)
                for node_id, node in by_id.items() if hasattr(node.executor_spec, "beam_pipeline_args")}

    args = beam_args()
    assert set(args) >= {"AvcExampleGen", "StatisticsGen", "Transform"} and "Evaluator" not in args
    for node_id, node_args in args.items():
        mode = [a for a in node_args if a.startswith("--direct_running_mode=")][-1]
        expected = "in_memory" if node_id == "AvcExampleGen" else "multi_processing"
        assert mode == f"--direct_running_mode={expected}", node_id
    # Nothing is added for a remote runner, or when the list is emptied.
    remote = beam_args(extra_beam_args=("--runner=DataflowRunner",))
    assert not any("in_memory" in a for node_args in remote.values() for a in node_args)
    none = beam_args(beam_single_process_components=())
    assert not any("in_memory" in a for node_args in none.values() for a in node_args)


def test_trainer_worker_pools_compile_to_a_vertex_training_job(tmp_path):
    out = tmp_path / "pipeline.json"
    argv = ["compile-kubeflow", "--image", IMAGE, "--home", HOME, "--data", DATA, "--output", str(out),
            "--trainer-workers", "3", "--trainer-machine-type", "n1-highmem-16", "--vertex-project", "my-project"]
    assert cli.main(argv) == 0
    spec = json.loads(out.read_text())
    trainer = spec["pipelineSpec"]["root"]["dag"]["tasks"]["Trainer"]
    executor = spec["pipelineSpec"]["deploymentSpec"]["executors"][trainer["componentRef"]["name"].replace(
        "comp-", "") + "_executor"]
    assert "google_cloud_ai_platform.trainer" in json.dumps(executor)
    value = trainer["inputs"]["parameters"]["custom_config"]["runtimeValue"]
    custom_config = json.loads(value.get("constant") or value["constantValue"]["stringValue"])
    pools = custom_config["ai_platform_training_args"]["worker_pool_specs"]
    assert [p["replica_count"] for p in pools] == [1, 2]
    assert all(p["container_spec"]["image_uri"] == IMAGE and p["machine_spec"]["machine_type"] == "n1-highmem-16"
               for p in pools)
    assert custom_config["ai_platform_enable_vertex"] is True and custom_config["epochs"] == 1


def test_trainer_worker_pools_need_a_project(tmp_path):
    argv = ["compile-kubeflow", "--image", IMAGE, "--home", HOME, "--data", DATA,
            "--output", str(tmp_path / "p.json"), "--trainer-workers", "2"]
    with pytest.raises(ValueError, match="vertex_project"):
        cli.main(argv)
