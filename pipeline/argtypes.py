"""argparse `type=` converters shared by the commands of `bin/poso`: a bad value becomes a usage
error that quotes it, instead of a traceback."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, Optional


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


def mysql_url(value: str) -> str:
    """--metadata-mysql: mysql://USER:PASSWORD@HOST:PORT/DATABASE, checked (the password never echoed)."""
    from pipeline import config as config_lib

    try:
        config_lib.mysql_connection(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


# Where `--home` comes from when the flag is not given: never the current directory, silently.
HOME_ENVIRONMENT_VARIABLE = "POSO_HOME"


def add_home_argument(parser: argparse.ArgumentParser, help_text: str, default: Optional[str] = None) -> None:
    """--home, defaulting to `default`, else to $POSO_HOME, and required when both are unset."""
    if default is not None:
        parser.add_argument("--home", default=default, metavar="HOME", help=help_text)
        return
    default = os.environ.get(HOME_ENVIRONMENT_VARIABLE) or None
    parser.add_argument("--home", default=default, required=default is None, metavar="HOME",
                        help=f"{help_text} (default: ${HOME_ENVIRONMENT_VARIABLE}"
                             + (f", now {default})" if default else "; required while it is unset)"))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default after its help, unless the help names it already or there is none
    worth showing (a required flag, an off switch, an empty list); descriptions keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or action.default in (None, False, [], "", argparse.SUPPRESS)
                or "(default" in text or not action.option_strings):
            return text
        return super()._get_help_string(action)
