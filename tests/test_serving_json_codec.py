"""REST JSON values to tensors: whole lists checked at once give what the element-by-element
conversion gives, and a value it would refuse is refused with the same message."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
import tensorflow as tf

from serving import errors, json_codec


def _one_by_one(values, dtype):
    """The element-by-element conversion, the reference for the whole-list path."""
    converted = [json_codec._leaf(value, dtype, "test") for value in values]
    if dtype == tf.string:
        array = np.empty(len(converted), dtype=object)
        array[:] = converted
        return array
    return np.array(converted, dtype=dtype.as_numpy_dtype)


@pytest.mark.parametrize("dtype, values", [
    (tf.int64, list(range(-3000, 3000))),
    (tf.int32, [2 ** 31 - 1, -2 ** 31, 0]),
    (tf.uint8, [0, 255, 7]),
    (tf.float32, [0.5, 1, -2, 3.25e38, float("inf"), 2 ** 24 - 1]),
    (tf.float64, [1e300, 3, -0.0]),
    (tf.bool, [True, False, True]),
    (tf.string, ["a", "ü", ""]),
    (tf.int64, []),
])
def test_whole_lists_convert_as_element_by_element(dtype, values):
    converted = json_codec.tensor_from_json(values, dtype, "test")
    expected = _one_by_one(values, dtype)
    assert converted.dtype == expected.dtype and converted.shape == expected.shape
    if dtype == tf.string:
        assert converted.tolist() == expected.tolist()
    else:
        np.testing.assert_array_equal(converted, expected)


def test_nested_lists_keep_their_shape():
    ids = [[row * 50 + column for column in range(50)] for row in range(100)]
    converted = json_codec.tensor_from_json(ids, tf.int64, "ids")
    assert converted.shape == (100, 50) and converted.dtype == np.int64
    np.testing.assert_array_equal(converted, np.array(ids))


@pytest.mark.parametrize("dtype, bad, words", [
    (tf.int32, 2 ** 31, "is not of expected type: int32"),
    (tf.int64, 2 ** 64, "is not of expected type: int64"),
    (tf.int64, 1.5, "Type: Number is not of expected type: int64"),
    (tf.int64, True, "is not of expected type: int64"),
    (tf.float32, 2 ** 25, "without loss of precision"),
    (tf.float32, 1e39, "without loss of precision"),
    (tf.bool, 1, "is not of expected type: bool"),
    (tf.string, 7, "is not of expected type: string"),
])
def test_one_bad_value_among_thousands_is_named(dtype, bad, words):
    good = {tf.bool: True, tf.string: "x"}.get(dtype, 1)
    values = [good] * 4000 + [bad] + [good] * 10
    with pytest.raises(errors.ServingError) as raised:
        json_codec.tensor_from_json(values, dtype, "'inputs' key: ids")
    assert words in raised.value.message
    assert "'inputs' key: ids" in raised.value.message


def test_b64_values_still_decode():
    values = [{"b64": base64.b64encode(b"\x00\xffraw").decode("ascii")}, "text"]
    converted = json_codec.tensor_from_json(values, tf.string, "examples")
    assert converted.tolist() == [b"\x00\xffraw", b"text"]


def test_plain_lists_skip_the_element_by_element_path():
    """The whole-list check is what makes a raw request of thousands of ids cheap."""
    assert json_codec._whole_array(list(range(5000)), tf.int64) is not None
    assert json_codec._whole_array([0.5] * 5000, tf.float32) is not None
    assert json_codec._whole_array(["id"] * 5000, tf.string) is not None
    assert json_codec._whole_array([1, 2 ** 40], tf.int32) is None
    assert json_codec._whole_array([1, {"b64": "AA=="}], tf.string) is None


def _raw_signature():
    from serving.servable import PREDICT_METHOD, Signature, TensorSpec

    return Signature("raw", PREDICT_METHOD, {
        "x": TensorSpec("x", tf.float32, tf.TensorShape([None])),
        "ids": TensorSpec("ids", tf.int64, tf.TensorShape([None, None])),
        "tag": TensorSpec("tag", tf.string, tf.TensorShape([None]))}, {})


def test_row_format_is_decoded_by_column_and_errors_still_name_the_instance():
    signature = _raw_signature()
    rows = [{"x": float(i), "ids": [i, i + 1], "tag": {"b64": "AP8="}} for i in range(3000)]
    inputs, row_format = json_codec.predict_inputs_from_json({"instances": rows}, signature)
    assert row_format and inputs["ids"].shape == (3000, 2) and inputs["ids"].dtype == np.int64
    assert inputs["x"].dtype == np.float32 and inputs["x"][2999] == 2999.0
    assert inputs["tag"][5] == b"\x00\xff"
    rows[1234]["ids"] = [1, 2, 3]
    with pytest.raises(errors.ServingError, match="element: 1234 key: ids"):
        json_codec.predict_inputs_from_json({"instances": rows}, signature)


def test_a_number_too_big_for_a_double_is_refused_but_infinity_is_not():
    with pytest.raises(errors.ServingError, match="Number too big to be stored in double: 1e400"):
        json_codec.parse_json_body(b'{"instances": [1.5, 1e400]}')
    assert json_codec.parse_json_body(b'{"instances": [Infinity, -1e308]}')["instances"] == [
        float("inf"), -1e308]


def test_decoding_stops_once_the_request_deadline_has_passed():
    import time

    import grpc

    from serving import deadlines

    rows = [{"x": 1.0, "ids": [1], "tag": "t"}] * 10
    with deadlines.deadline(0.001):
        time.sleep(0.002)
        with pytest.raises(errors.ServingError) as caught:
            json_codec.predict_inputs_from_json({"instances": rows}, _raw_signature())
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    json_codec.predict_inputs_from_json({"instances": rows}, _raw_signature())  # no deadline


def test_rest_parse_benchmark_prints_throughput(capsys):
    from benchmarks import rest_parse

    assert rest_parse.main(["--megabytes", "0.05", "--repeats", "1",
                            "--distinct-rows", "20"]) == 0
    printed = capsys.readouterr().out
    assert len(re.findall(r"\d+\.\d MB/s", printed)) == 2, printed
