"""REST request decoding throughput: MB/s from a :predict body to the model's input arrays.

Builds row-format ("instances") and columnar ("inputs") bodies of the ranking model's raw
signature (`serving_raw`: one value or id list per feature_specs input, as
`serving.instances.raw_instances` writes them) up to `--megabytes`, and times what the
server does before the model runs: `json_codec.parse_json_body` (stdlib json, checking
every float literal) and `json_codec.predict_inputs_from_json` (to numpy). No model is
called, so no trained model is needed: the signature's inputs are `models.export`'s
`raw_input_signature()`, what every exported ranking model declares.

    bin/poso-env python -m benchmarks.rest_parse --megabytes 64

The server's REST timeout is 30 s by default (`--rest_api_timeout_in_ms`): a body of the
size limit (64 MiB) must decode well within it.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from typing import List, Optional, Sequence

__all__ = ["add_arguments", "run", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--megabytes", type=float, default=64.0,
                        help="size of each body (default 64, the server's request limit)")
    parser.add_argument("--distinct-rows", type=int, default=2000,
                        help="random rows the body repeats (default 2000)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per body (best kept)")
    return parser


def _json_value(value):
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, list):
        return [_json_value(item) for item in value]
    return value


def _bodies(rows: List[dict], megabytes: float) -> dict:
    """{"row": body, "columnar": body} of about `megabytes` each."""
    one = len(json.dumps(rows[0])) + 2
    count = max(1, int(megabytes * 1e6 / one))
    instances = (rows * (count // len(rows) + 1))[:count]
    columns = {name: [row[name] for row in instances] for name in rows[0]}
    return {
        "row": json.dumps({"signature_name": "serving_raw", "instances": instances}).encode(),
        "columnar": json.dumps({"signature_name": "serving_raw", "inputs": columns}).encode(),
    }


def run(args: argparse.Namespace) -> int:
    import tensorflow as tf

    from benchmarks import serving_latency
    from models import export
    from serving import instances as instances_lib
    from serving import json_codec
    from serving.servable import PREDICT_METHOD, Signature, TensorSpec

    signature = Signature(
        "serving_raw", PREDICT_METHOD,
        {name: TensorSpec(name, spec.dtype, tf.TensorShape(spec.shape))
         for name, spec in export.raw_input_signature().items()}, {})
    examples = serving_latency.synthetic_examples(args.distinct_rows, seed=0)
    rows = [{name: _json_value(value) for name, value in row.items()}
            for row in instances_lib.raw_instances(examples)]
    print(f"REST decoding: signature serving_raw ({len(signature.inputs)} inputs), "
          f"{args.distinct_rows} distinct random rows, best of {args.repeats}")
    for layout, body in _bodies(rows, args.megabytes).items():
        best = None
        for _ in range(args.repeats):
            started = time.perf_counter()
            document = json_codec.parse_json_body(body)
            parsed = time.perf_counter()
            arrays, _ = json_codec.predict_inputs_from_json(document, signature)
            done = time.perf_counter()
            del document
            if best is None or done - started < best[0]:
                best = (done - started, parsed - started, done - parsed)
            batch = len(next(iter(arrays.values())))
            del arrays
        total, json_s, arrays_s = best
        megabytes = len(body) / 1e6
        print(f"  {layout:8s} {megabytes:6.1f} MB, {batch} instances: {total:6.2f} s "
              f"(json {json_s:.2f} s + arrays {arrays_s:.2f} s) = {megabytes / total:5.1f} MB/s")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
               .parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
