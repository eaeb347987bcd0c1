"""Which models to serve, from where, and which of their versions.

The configuration is TensorFlow Serving's own `ModelServerConfig` proto (the
`--model_config_file` text format), so the same file drives this server and a real
`tensorflow_model_server`:

    model_config_list {
      config {
        name: "ranker"
        base_path: "/models/ranker"
        model_platform: "tensorflow"
        model_version_policy { specific { versions: 3 versions: 4 } }
        version_labels { key: "stable" value: 3 }
        version_labels { key: "canary" value: 4 }
      }
    }

A model's versions are the integer-named sub-directories of its base path
(`BASE/<version>/saved_model.pb`); the version policy picks the aspired ones:

* latest (the default): the `num_versions` (default 1) highest versions;
* all: every version;
* specific: the listed versions that exist.

Versions no longer aspired are unloaded as TensorFlow Serving's availability-preserving
policy does (serving/manager.py): once an aspired version is available, or at once when no
version is aspired (e.g. a specific policy naming only absent versions, or an empty base
path).
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Mapping, Optional, Set

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

__all__ = [
    "ModelServerConfig", "ModelConfig", "single_model_config", "parse_model_server_config",
    "load_model_server_config", "validate_model_server_config", "list_versions",
    "aspired_versions", "policy_name", "SAVED_MODEL_FILENAMES",
]

ModelServerConfig = model_server_config_pb2.ModelServerConfig
ModelConfig = model_server_config_pb2.ModelConfig

SAVED_MODEL_FILENAMES = ("saved_model.pb", "saved_model.pbtxt")
_SUPPORTED_PLATFORMS = ("", "tensorflow")


def single_model_config(model_name: str, base_path: str) -> ModelServerConfig:
    """The config `--model_name NAME --model_base_path PATH` stands for (latest version)."""
    config = ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = model_name
    model.base_path = os.fspath(base_path)
    model.model_platform = "tensorflow"
    validate_model_server_config(config)
    return config


def parse_model_server_config(text: str, source: str = "<string>") -> ModelServerConfig:
    """Parses and validates a text-format ModelServerConfig; errors name `source`."""
    config = ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ValueError(f"{source}: not a text-format ModelServerConfig: {error}") from error
    validate_model_server_config(config, source)
    return config


def load_model_server_config(path: str) -> ModelServerConfig:
    """Reads a `--model_config_file` (text-format ModelServerConfig)."""
    with open(path, encoding="utf-8") as config_file:
        return parse_model_server_config(config_file.read(), source=os.fspath(path))


def validate_model_server_config(config: ModelServerConfig, source: str = "model config") -> None:
    """Raises ValueError naming the first problem in `config`."""
    if config.WhichOneof("config") == "custom_model_config":
        raise ValueError(f"{source}: custom_model_config is not supported; use model_config_list")
    seen: Set[str] = set()
    for index, model in enumerate(config.model_config_list.config):
        where = f"{source}: model_config_list.config[{index}]"
        if not model.name:
            raise ValueError(f"{where}: missing name")
        if "/" in model.name or ":" in model.name:
            raise ValueError(f"{where}: name {model.name!r} may not contain '/' or ':'")
        if model.name in seen:
            raise ValueError(f"{where}: duplicate model name {model.name!r}")
        seen.add(model.name)
        if not model.base_path:
            raise ValueError(f"{where} ({model.name}): missing base_path")
        if model.model_platform not in _SUPPORTED_PLATFORMS:
            raise ValueError(
                f"{where} ({model.name}): model_platform {model.model_platform!r} is not "
                "supported; only 'tensorflow'")
        policy = model.model_version_policy
        if policy.WhichOneof("policy_choice") == "latest" and policy.latest.num_versions < 0:
            raise ValueError(f"{where} ({model.name}): latest.num_versions must be positive")
        if policy.WhichOneof("policy_choice") == "specific" and not policy.specific.versions:
            raise ValueError(f"{where} ({model.name}): specific policy lists no versions")
        for label, version in model.version_labels.items():
            if not label:
                raise ValueError(f"{where} ({model.name}): empty version label")
            if version < 0:
                raise ValueError(
                    f"{where} ({model.name}): label {label!r} points at negative version {version}")


def list_versions(base_path: str, incomplete: Optional[List[str]] = None) -> Dict[int, str]:
    """{version: directory} of the integer-named sub-directories of `base_path`.

    Directories without a saved_model.pb(txt) yet are skipped (and appended to `incomplete`
    when given): a version that is still being copied in becomes visible once its graph file
    exists (a half-written graph file is refused at load time and retried when the file
    changes).
    """
    versions: Dict[int, str] = {}
    try:
        entries = list(os.scandir(base_path))
    except (FileNotFoundError, NotADirectoryError):
        return versions
    for entry in entries:
        if not entry.name.isdigit() or not entry.is_dir():
            continue
        if any(os.path.exists(os.path.join(entry.path, name)) for name in SAVED_MODEL_FILENAMES):
            versions[int(entry.name)] = entry.path
        elif incomplete is not None:
            incomplete.append(entry.path)
    return versions


def aspired_versions(available: Iterable[int], model: ModelConfig) -> Set[int]:
    """The versions among `available` that `model`'s version policy wants loaded."""
    versions = sorted(set(available), reverse=True)
    policy = model.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return set(versions)
    if choice == "specific":
        return set(versions) & set(policy.specific.versions)
    num_versions = policy.latest.num_versions if choice == "latest" else 0
    return set(versions[: max(num_versions, 1)])


def policy_name(model: ModelConfig) -> str:
    """A short description of the version policy, for logs."""
    policy = model.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return "all"
    if choice == "specific":
        return f"specific {sorted(policy.specific.versions)}"
    num_versions = policy.latest.num_versions if choice == "latest" else 0
    return f"latest {max(num_versions, 1)}"


def version_labels(model: ModelConfig) -> Mapping[str, int]:
    return dict(model.version_labels)


def find_model(config: ModelServerConfig, name: str) -> Optional[ModelConfig]:
    for model in config.model_config_list.config:
        if model.name == name:
            return model
    return None
