"""TF Serving's models.config, generated in one place, and the version pin that rollbacks leave.

Every models.config of the project comes from `models_config_text`: the one the pipeline keeps
beside the serving base directory (components/serving_config_writer.py, after each push), the one
`poso rollback` writes, and the container-side deploy/models.config (`poso serving-config`).

The pin (HOME/serving/pinned_version.json, written by `poso rollback VERSION`) makes the config
serve that version only (`specific { versions: N }`) instead of the latest. The pipeline keeps
pushing new versions but does not serve them until the pin is lifted (`poso rollback --release`,
or `poso run --unpin`), so a daily run never silently undoes a rollback.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Optional

PIN_FILE = "pinned_version.json"


def models_config_text(model_name: str, base_path: str, pinned_version: Optional[int] = None,
                       header: str = "") -> str:
    """A text-format ModelServerConfig serving `model_name` from `base_path`: its latest version,
    or only `pinned_version`. `header` lines become comments at the top."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add(name=model_name, base_path=base_path, model_platform="tensorflow")
    if pinned_version is None:
        model.model_version_policy.latest.num_versions = 1
    else:
        model.model_version_policy.specific.versions.append(pinned_version)
    comments = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    return comments + text_format.MessageToString(config)


def read_pin(pin_path: str) -> Optional[int]:
    """The pinned version, or None when nothing is pinned."""
    if not os.path.exists(pin_path):
        return None
    with open(pin_path) as f:
        return int(json.load(f)["version"])


def write_pin(pin_path: str, version: int) -> None:
    _write_atomically(pin_path, json.dumps({"version": version, "pinned_at": datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds")}) + "\n")


def remove_pin(pin_path: str) -> Optional[int]:
    """Lifts the pin; returns the version that was pinned (None if none was)."""
    version = read_pin(pin_path)
    if version is not None:
        os.remove(pin_path)
    return version


def write_models_config(models_config_path: str, model_name: str, base_path: str, pin_path: str) -> Optional[int]:
    """Writes the models.config that serves the pinned version if there is a pin, else the latest;
    returns the pinned version."""
    pinned = read_pin(pin_path)
    _write_atomically(models_config_path, models_config_text(model_name, base_path, pinned))
    return pinned


def _write_atomically(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path)  # servers polling the file never see half of it
