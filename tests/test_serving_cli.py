"""`poso predict` (serving.client.main) against this project's server on a ranking stub model.

The stub (tests/ranking_stub.py) has the ranking model's serving_default
and serving_raw signatures and closed-form per-task scores, so each test knows the answer.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tensorflow as tf

import feature_specs as fs
import raw_examples
from pipeline import cli
import ranking_stub
from serving import client, instances, server as server_lib

MODEL = "ranker"
TASKS = [task.name for task in fs.TASKS]
ROWS = raw_examples.make_raw_rows(5, seed=7)
EXAMPLES = raw_examples.serialize_all(ROWS)
EXPECTED = ranking_stub.ranking_stub_scores([row[fs.PC.source] for row in ROWS],
                                       [len(row[fs.HIST_VIDEO_IDS]) for row in ROWS])
# The raw features of each row, as `poso predict --json` takes them.
RAW_ROWS = instances.raw_instances(EXAMPLES)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli_models") / MODEL
    ranking_stub.export_ranking_stub_model(str(base / "1"))
    with server_lib.start_server(str(base), MODEL, grpc_port=0, rest_port=0,
                                 file_system_poll_wait_s=0) as server:
        yield {"grpc": server.grpc_address, "rest": server.rest_url}


def predict(capsys, *argv):
    """(exit code, stdout, stderr) of one `poso predict` run."""
    code = client.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def predict_json(capsys, endpoint, protocol, *argv):
    code, out, err = predict(capsys, f"--{protocol}", endpoint[protocol], "--model", MODEL,
                             "--format", "json", *argv)
    assert code == 0, err
    return json.loads(out)


def assert_scores(document, rows=slice(None)):
    predictions = document["predictions"]
    expected = {task: EXPECTED[task][rows] for task in TASKS}
    assert len(predictions) == len(expected[TASKS[0]])
    for task in TASKS:
        np.testing.assert_allclose([p[task] for p in predictions], expected[task], rtol=1e-5)


@pytest.fixture(scope="module")
def tfrecords(tmp_path_factory):
    """{"gzip": path, "plain": path} of the EXAMPLES (gzip named without .gz on purpose)."""
    root = tmp_path_factory.mktemp("records")
    gzip_path = raw_examples.write_gzip_tfrecords(str(root / "examples-gzip"), EXAMPLES)
    plain_path = str(root / "examples.tfrecord")
    with tf.io.TFRecordWriter(plain_path) as writer:
        for example in EXAMPLES:
            writer.write(example)
    return {"gzip": gzip_path, "plain": plain_path}


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_raw_feature_rows_from_a_file(protocol, endpoint, tmp_path, capsys):
    rows_file = tmp_path / "rows.json"
    rows_file.write_text(json.dumps(RAW_ROWS))
    assert_scores(predict_json(capsys, endpoint, protocol, "--json", str(rows_file)))


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
@pytest.mark.parametrize("compression", ["gzip", "plain"])
def test_serialized_examples_from_tfrecords(protocol, compression, endpoint, tfrecords,
                                            capsys):
    document = predict_json(capsys, endpoint, protocol, "--examples", tfrecords[compression],
                            "--max-examples", "0")
    assert_scores(document)


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_examples_to_the_raw_signature_are_decoded_client_side(protocol, endpoint, tfrecords,
                                                               capsys):
    document = predict_json(capsys, endpoint, protocol, "--examples", tfrecords["gzip"],
                            "--signature", instances.RAW_SIGNATURE, "--max-examples", "3")
    assert_scores(document, slice(0, 3))


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_tf_serving_request_bodies(protocol, endpoint, capsys, monkeypatch):
    rows_body = {"signature_name": instances.RAW_SIGNATURE, "instances": RAW_ROWS[:2]}
    assert_scores(predict_json(capsys, endpoint, protocol, "--json", json.dumps(rows_body)),
                  slice(0, 2))
    # Columnar, with ragged histories left unpadded (the client pads them) and a string
    # feature sent as TF Serving's {"b64": ...}.
    columns = {name: [row[name] for row in RAW_ROWS] for name in RAW_ROWS[0]}
    columns[fs.HIST_VIDEO_IDS] = [row[fs.HIST_VIDEO_IDS] for row in ROWS]
    string_feature = next(f.name for f in fs.model_input_features() if f.dtype is fs.Dtype.STRING)
    columns[string_feature] = [{"b64": "VU5LTk9XTg=="} for _ in RAW_ROWS]  # "UNKNOWN"
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"inputs": columns})))
    assert_scores(predict_json(capsys, endpoint, protocol, "--json", "-"))


def test_json_lines_and_a_single_object(endpoint, tmp_path, capsys):
    lines_file = tmp_path / "rows.jsonl"
    lines_file.write_text("\n".join(json.dumps(row) for row in RAW_ROWS[:3]) + "\n")
    assert_scores(predict_json(capsys, endpoint, "grpc", "--json", f"@{lines_file}"),
                  slice(0, 3))
    assert_scores(predict_json(capsys, endpoint, "rest", "--json", json.dumps(RAW_ROWS[4])),
                  slice(4, 5))


def test_table_lists_tasks_in_order_with_one_line_per_row(endpoint, capsys):
    code, out, err = predict(capsys, "--grpc", endpoint["grpc"], "--model", MODEL,
                             "--json", json.dumps(RAW_ROWS))
    assert code == 0, err
    header, *lines = out.strip().splitlines()
    assert header.split() == ["row"] + TASKS
    assert len(lines) == len(ROWS)
    for row, line in enumerate(lines):
        cells = line.split()
        assert int(cells[0]) == row
        assert [float(cell) for cell in cells[1:]] == pytest.approx(
            [EXPECTED[task][row] for task in TASKS], abs=5e-5)


@pytest.mark.parametrize("argv, message", [
    ([], "one of the arguments --json --examples is required"),
    (["--json", "[]", "--examples", "x"], "not allowed with argument"),
    (["--grpc", "--rest", "--json", "[]"], "not allowed with argument"),
    (["--json", "[{}]", "--format", "yaml"], "invalid choice: 'yaml'"),
    (["--json", "[{}]", "--max-examples", "many"], "invalid int value: 'many'"),
])
def test_bad_flags_exit_2_with_usage(argv, message, capsys):
    code, out, err = predict(capsys, *argv)
    assert code == 2 and not out
    assert "usage: poso predict" in err and message in err


def _drop(row, name):
    return {key: value for key, value in row.items() if key != name}


@pytest.mark.parametrize("make_argv, message", [
    (lambda tmp: ["--json", str(tmp / "missing.json")], "no such file"),
    (lambda tmp: ["--json", '[{"a": 1,}]'], "--json: not JSON"),
    (lambda tmp: ["--json", "[]"], "list of rows is empty"),
    (lambda tmp: ["--json", json.dumps([_drop(RAW_ROWS[0], fs.PC.source)])],
     f"row 0 lacks ['{fs.PC.source}'] for signature 'serving_raw'"),
    (lambda tmp: ["--json", json.dumps([dict(RAW_ROWS[0], bogus=1)])],
     "row 0 has unexpected ['bogus']"),
    (lambda tmp: ["--json", json.dumps({"instances": RAW_ROWS, "inputs": {}})], "not both"),
    (lambda tmp: ["--json", json.dumps(RAW_ROWS[:1]), "--signature", "serving_default"],
     "takes serialized tf.Examples (input 'examples'), not raw features"),
    (lambda tmp: ["--json", json.dumps([dict(RAW_ROWS[0], **{fs.PC.source: "lots"})])],
     f"input '{fs.PC.source}' expects int64 but has non-numeric values"),
    (lambda tmp: ["--json", json.dumps({"signature_name": "gates", "instances": RAW_ROWS}),
                  "--signature", instances.RAW_SIGNATURE], "disagrees"),
    (lambda tmp: ["--examples", str(tmp / "nothing-*.tfrecord")], "matches no file"),
    (lambda tmp: ["--examples", str(_write(tmp / "junk.tfrecord", b"not a record file"))],
     "is not a TFRecord file"),
])
def test_bad_input_exits_2_naming_the_problem(make_argv, message, endpoint, tmp_path, capsys):
    code, out, err = predict(capsys, "--grpc", endpoint["grpc"], "--model", MODEL,
                             *make_argv(tmp_path))
    assert code == 2 and not out
    assert err.startswith("error: ") and message in err, err


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_server_refusals_exit_1(protocol, endpoint, capsys):
    code, out, err = predict(capsys, f"--{protocol}", endpoint[protocol], "--model", "nope",
                             "--json", json.dumps(RAW_ROWS[:1]))
    assert code == 1 and not out
    assert ("NOT_FOUND" if protocol == "grpc" else "HTTP 404") in err


@pytest.mark.parametrize("protocol, address", [("grpc", "127.0.0.1:1"),
                                               ("rest", "http://127.0.0.1:1")])
def test_unreachable_server_exits_1(protocol, address, capsys):
    code, out, err = predict(capsys, f"--{protocol}", address, "--json", json.dumps(RAW_ROWS[:1]),
                             "--timeout", "5")
    assert code == 1 and not out
    assert f"UNAVAILABLE: cannot reach {address}" in err


def poso(*argv) -> int:
    """The exit code of `poso ARGV` (pipeline.cli, the bin/poso entry point)."""
    try:
        return cli.main(list(argv))
    except SystemExit as exited:  # argparse exits on --help and bad flags
        return exited.code if isinstance(exited.code, int) else 0


@pytest.mark.parametrize("command, usage", [("predict", "usage: poso predict"),
                                            ("serve", "usage: poso serve")])
def test_help_through_the_poso_command(command, usage, capsys):
    assert poso(command, "--help") == 0
    assert usage in capsys.readouterr().out


def test_predict_help_names_the_signatures_the_client_uses(capsys):
    assert poso("predict", "--help") == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert f"Sent to signature {instances.RAW_SIGNATURE} if" in shown
    assert f"Sent to signature {client.DEFAULT_SIGNATURE}" in shown
    assert client.DEFAULT_SIGNATURE == instances.EXAMPLES_SIGNATURE


def test_predict_through_the_poso_command(endpoint, capsys):
    assert poso("predict", "--grpc", endpoint["grpc"], "--model", MODEL, "--format", "json",
                "--json", json.dumps(RAW_ROWS[:2])) == 0
    assert_scores(json.loads(capsys.readouterr().out), slice(0, 2))
    assert poso("predict", "--grpc", endpoint["grpc"], "--format", "yaml", "--json", "[]") == 2
