"""argparse `type=` converters shared by the commands of `bin/poso`: a bad value becomes a usage
error that quotes it, instead of a traceback."""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value!r}")
    return number


def json_object(value: str) -> Dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return parsed


def model_config_overrides(value: str) -> Dict[str, Any]:
    """--config: a JSON object of `models.model.ModelConfig` fields, checked against it."""
    from models import model as model_lib

    overrides = json_object(value)
    try:
        model_lib.ModelConfig.from_dict(overrides)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return overrides
