"""Keeps the configured models' aspired versions loaded, and finds the one a request wants.

Every `poll_interval_s` the manager lists each model's base path, asks the version policy
which versions are aspired, and reconciles:

1. each aspired version not yet loaded is loaded, warmed up from its
   `assets.extra/tf_serving_warmup_requests`, and only then published (one dict swap under
   a lock), so requests never see a half-ready version;
2. a version that fails to load or warm up is refused: the reason is logged and kept in its
   status (state END with the error), and it is not retried until its files change;
3. versions that are no longer aspired are unloaded as TensorFlow Serving's
   availability-preserving policy does: once an aspired version is available, or at once
   when no version is aspired at all (a `specific` policy naming only absent versions, an
   empty base path); while aspired versions exist but none is available, the highest of the
   others keeps serving, so a refused new version leaves the previous one serving;
4. version labels are the config's, and as in TensorFlow Serving a config whose label names
   a version that is not AVAILABLE is refused with FAILED_PRECONDITION (at start too), unless
   `allow_version_labels_for_unavailable_models` lets a new label (not a moved one) name it.

Requests that already hold an unloaded version finish on it; new ones resolve to what is
published now. Version states are TensorFlow Serving's (START, LOADING, AVAILABLE,
UNLOADING, END) and are what GetModelStatus reports.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Callable, Dict, List, Optional, Set, Tuple

import grpc
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2, model_pb2

from serving import config as config_lib
from serving import errors, warmup
from serving.batching import BatchingOptions
from serving.metrics import ServerMetrics
from serving.servable import SavedModelServable

__all__ = ["ModelManager", "VersionState"]

logger = logging.getLogger(__name__)

VersionState = get_model_status_pb2.ModelVersionStatus.State
Fingerprint = Tuple[Tuple[str, int, int], ...]


@dataclasses.dataclass
class _VersionRecord:
    state: int
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""


@dataclasses.dataclass
class _Model:
    config: config_lib.ModelConfig
    servables: Dict[int, SavedModelServable] = dataclasses.field(default_factory=dict)
    records: Dict[int, _VersionRecord] = dataclasses.field(default_factory=dict)
    refused: Dict[int, Fingerprint] = dataclasses.field(default_factory=dict)
    labels: Dict[str, int] = dataclasses.field(default_factory=dict)  # what requests resolve
    label_notes: Set[str] = dataclasses.field(default_factory=set)
    warned_empty: bool = False
    warned_incomplete: Set[str] = dataclasses.field(default_factory=set)


def _fingerprint(directory: str) -> Fingerprint:
    """(path, size, mtime) of every file under `directory`: changes when files change."""
    entries = []
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            try:
                stat = os.stat(path)
            except OSError:
                continue
            entries.append((os.path.relpath(path, directory), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


def _load_error(error: BaseException) -> Tuple[grpc.StatusCode, str]:
    if isinstance(error, errors.ServingError):
        return error.code, error.message
    if isinstance(error, tf.errors.OpError):
        return errors.code_from_tf_error(error), (error.message or str(error)).strip()
    if isinstance(error, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    return grpc.StatusCode.UNKNOWN, f"{type(error).__name__}: {error}"


class ModelManager:
    """The registry of served models and their versions.

    Args:
      config: the ModelServerConfig to serve.
      batching: batch Predict calls on batchable signatures with these options (None: off).
      enable_warmup: replay each version's warm-up requests before publishing it.
      warmup_iterations: how many times the warm-up records are replayed.
      poll_interval_s: seconds between scans of the base paths (<= 0: scan only at start
        and on `poll_once`).
      config_file: a models.config to re-read every `config_poll_interval_s` (> 0).
      allow_version_labels_for_unavailable_models: a new label may name a version that is
        not available yet (tensorflow_model_server's flag of the same name).
      metrics: where version loads and batch sizes are counted.
    """

    def __init__(self, config: config_lib.ModelServerConfig, *,
                 batching: Optional[BatchingOptions] = None, enable_warmup: bool = True,
                 warmup_iterations: int = 1, poll_interval_s: float = 1.0,
                 config_file: Optional[str] = None, config_poll_interval_s: float = 0.0,
                 allow_version_labels_for_unavailable_models: bool = False,
                 metrics: Optional[ServerMetrics] = None):
        config_lib.validate_model_server_config(config)
        self._config = config_lib.ModelServerConfig()
        self._config.CopyFrom(config)
        self._batching = batching
        self._enable_warmup = enable_warmup
        self._warmup_iterations = warmup_iterations
        self._poll_interval_s = poll_interval_s
        self._config_file = config_file
        self._config_poll_interval_s = config_poll_interval_s
        self._allow_unavailable_labels = allow_version_labels_for_unavailable_models
        self._metrics = metrics
        self._config_file_text: Optional[str] = None
        self._models: Dict[str, _Model] = {
            model.name: _Model(config=model) for model in self._config.model_config_list.config}
        self._lock = threading.Lock()          # guards what requests read
        self._reconcile_lock = threading.RLock()  # one reconcile (load/unload) at a time
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Loads the initial versions (blocking), then starts polling in the background.
        Raises ServingError (FAILED_PRECONDITION) for a label naming a version that is not
        available, as tensorflow_model_server refuses to start."""
        if self._config_file:
            with open(self._config_file, encoding="utf-8") as config_file:
                self._config_file_text = config_file.read()
        for model in self._config.model_config_list.config:
            logger.info("Adding model %s from base path %s (version policy: %s)", model.name,
                        model.base_path, config_lib.policy_name(model))
        self._check_labels(self._config)
        self.poll_once()
        if self._poll_interval_s > 0:
            self._start_thread("model-poller", self._poll_interval_s, self.poll_once)
        if self._config_file and self._config_poll_interval_s > 0:
            self._start_thread("config-poller", self._config_poll_interval_s,
                               self._reread_config_file)

    def _start_thread(self, name: str, interval: float, action: Callable[[], None]) -> None:
        def loop():
            while not self._stop.wait(interval):
                try:
                    action()
                except Exception:  # a bad poll must not end polling
                    logger.exception("%s: poll failed", name)
        thread = threading.Thread(target=loop, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        """Stops polling and unloads every version."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        with self._reconcile_lock:
            for name, model in list(self._models.items()):
                for version in sorted(model.servables):
                    self._unload(name, model, version)

    # -- configuration ---------------------------------------------------------------------

    @property
    def config(self) -> config_lib.ModelServerConfig:
        with self._lock:
            copy = config_lib.ModelServerConfig()
            copy.CopyFrom(self._config)
            return copy

    def reload_config(self, config: config_lib.ModelServerConfig) -> None:
        """Serves `config` from now on: new models load, removed ones unload, policies apply.
        Raises ValueError for an invalid config and ServingError (FAILED_PRECONDITION) for a
        label naming a version that is not available; either leaves the current config."""
        config_lib.validate_model_server_config(config)
        copy = config_lib.ModelServerConfig()
        copy.CopyFrom(config)
        config = copy
        with self._reconcile_lock:
            self._check_labels(config)
            wanted = {model.name: model for model in config.model_config_list.config}
            for name in [name for name in self._models if name not in wanted]:
                model = self._models[name]
                for version in sorted(model.servables):
                    self._unload(name, model, version)
                with self._lock:
                    del self._models[name]
                logger.info("Model %s removed from the config", name)
            with self._lock:
                for name, model_config in wanted.items():
                    if name in self._models:
                        self._models[name].config = model_config
                    else:
                        self._models[name] = _Model(config=model_config)
                self._config = config
            self.poll_once()

    def _reread_config_file(self) -> None:
        with open(self._config_file, encoding="utf-8") as config_file:
            text = config_file.read()
        if text == self._config_file_text:
            return
        self._config_file_text = text  # an error is reported once, not at every poll
        logger.info("Config file %s changed; reloading", self._config_file)
        try:
            self.reload_config(config_lib.parse_model_server_config(text,
                                                                    source=self._config_file))
        except ValueError as error:
            logger.error("Keeping the current config: %s", error)
        except errors.ServingError as error:
            logger.error("Keeping the current config: %s: %s", error.code.name, error.message)

    def _check_labels(self, config: config_lib.ModelServerConfig) -> None:
        """FAILED_PRECONDITION unless every label of `config` names an AVAILABLE version
        (TF Serving's ServerCore::UpdateModelVersionLabelMap, with its flag)."""
        for model_config in config.model_config_list.config:
            model = self._models.get(model_config.name)
            available = model.servables if model is not None else {}
            current = model.labels if model is not None else {}
            for label, version in sorted(model_config.version_labels.items()):
                if version in available:
                    continue
                if self._allow_unavailable_labels and current.get(label, version) == version:
                    continue
                raise errors.failed_precondition(
                    f"Request to assign label to version {version} of model "
                    f"{model_config.name}, which is not currently available for inference")

    # -- reconciling -----------------------------------------------------------------------

    def poll_once(self) -> None:
        """Scans every model's base path once and loads / unloads versions accordingly."""
        with self._reconcile_lock:
            for name in list(self._models):
                model = self._models.get(name)
                if model is not None:
                    self._reconcile(name, model)

    def _reconcile(self, name: str, model: _Model) -> None:
        model_config = model.config
        if not os.path.isdir(model_config.base_path):
            if not model.warned_empty:  # keep what is loaded: the path may come back
                logger.error("Could not find base path %s for servable %s",
                             model_config.base_path, name)
                model.warned_empty = True
            return
        incomplete: List[str] = []
        on_disk = config_lib.list_versions(model_config.base_path, incomplete)
        for path in sorted(set(incomplete) - model.warned_incomplete):
            logger.warning("Version directory %s of servable %s has no saved_model.pb or "
                           "saved_model.pbtxt; it is not loaded until one appears", path, name)
        model.warned_incomplete = set(incomplete)
        if not on_disk:
            if not model.warned_empty:
                logger.warning("No versions of servable %s found under base path %s. Did you "
                               "forget to name your leaf directory as a number (eg. '/1/')?",
                               name, model_config.base_path)
                model.warned_empty = True
        else:
            model.warned_empty = False
        aspired = config_lib.aspired_versions(on_disk, model_config)
        for version in sorted(aspired - set(model.servables), reverse=True):
            path = on_disk[version]
            if version in model.refused and model.refused[version] == _fingerprint(path):
                continue
            self._load(name, model, version, path)
        self._update_labels(name, model)
        unaspired = sorted(set(model.servables) - aspired)
        if aspired and not any(version in model.servables for version in aspired):
            unaspired = unaspired[:-1]  # the highest keeps serving until an aspired one does
        for version in unaspired:
            self._unload(name, model, version)

    def _load(self, name: str, model: _Model, version: int, path: str) -> None:
        fingerprint = _fingerprint(path)
        with self._lock:
            model.records[version] = _VersionRecord(VersionState.LOADING)
        logger.info("Loading servable version {name: %s version: %d} from %s", name, version,
                    path)
        servable = None
        try:
            servable = SavedModelServable.load(
                name, version, path, batching=self._batching,
                on_batch=self._metrics.record_batch if self._metrics is not None else None)
            if self._enable_warmup:
                servable.warmup_requests_replayed = warmup.replay_warmup_requests(
                    servable, self._warmup_iterations)
        except Exception as error:  # any failure refuses the version, never the server
            if servable is not None:
                servable.close()
            code, reason = _load_error(error)
            message = f"Failed to load version {version} of model {name} from {path}: {reason}"
            logger.error("Loading servable version {name: %s version: %d} failed: %s", name,
                         version, reason)
            if self._metrics is not None:
                self._metrics.record_load(path, success=False)
            with self._lock:
                model.records[version] = _VersionRecord(VersionState.END, code, message)
                model.refused[version] = fingerprint
            return
        with self._lock:
            # Copy-on-write: a request that already read `servables` keeps a consistent view.
            model.servables = {**model.servables, version: servable}
            model.records[version] = _VersionRecord(VersionState.AVAILABLE)
            model.refused.pop(version, None)
        if self._metrics is not None:
            self._metrics.record_load(path, success=True)
        logger.info("Successfully loaded servable version {name: %s version: %d}: AVAILABLE "
                    "(signatures %s; %d warm-up requests replayed)", name, version,
                    sorted(servable.signatures), servable.warmup_requests_replayed)

    def _unload(self, name: str, model: _Model, version: int) -> None:
        with self._lock:
            servable = model.servables.get(version)
            if servable is None:
                return
            model.records[version] = _VersionRecord(VersionState.UNLOADING)
            model.servables = {v: s for v, s in model.servables.items() if v != version}
        logger.info("Unloading servable version {name: %s version: %d}", name, version)
        servable.close()
        with self._lock:
            model.records[version] = _VersionRecord(VersionState.END)
        logger.info("Done unloading servable version {name: %s version: %d}", name, version)

    def _update_labels(self, name: str, model: _Model) -> None:
        labels = dict(model.config.version_labels)  # checked when the config was taken
        notes = {f"label {label!r} points at version {version}, which is not available"
                 for label, version in labels.items() if version not in model.servables}
        if labels != model.labels:
            with self._lock:
                model.labels = labels
            logger.info("Labels of model %s: %s", name, labels)
        for note in sorted(notes - model.label_notes):  # say each once, not every poll
            logger.warning("Model %s: %s", name, note)
        model.label_notes = notes

    # -- what requests use -----------------------------------------------------------------

    def servable(self, model_spec: model_pb2.ModelSpec) -> SavedModelServable:
        """The version a request's ModelSpec names (latest available when none is named)."""
        name = model_spec.name
        if not name:
            raise errors.invalid_argument("Missing ModelSpec name")
        with self._lock:
            model = self._models.get(name)
            servables = model.servables if model is not None else {}
            choice = model_spec.WhichOneof("version_choice")
            if choice == "version_label":
                version = self._version_for_label(model, model_spec.version_label)
                choice = "version"
            elif choice == "version":
                version = model_spec.version.value
            if choice == "version":
                servable = servables.get(version)
                if servable is None:
                    raise errors.not_found(
                        f"Servable not found for request: Specific({name}, {version}); "
                        f"available versions: {sorted(servables)}")
                return servable
            if not servables:
                raise errors.not_found(f"Servable not found for request: Latest({name})")
            return servables[max(servables)]

    def _version_for_label(self, model: Optional[_Model], label: str) -> int:
        labels = model.labels if model is not None else {}
        if label not in labels:
            raise errors.invalid_argument(
                f"Unrecognized servable version label: {label}; known labels: {sorted(labels)}")
        return labels[label]

    def model_status(self, model_spec: model_pb2.ModelSpec
                     ) -> get_model_status_pb2.GetModelStatusResponse:
        """GetModelStatus: the state of every known version, or of the one named."""
        name = model_spec.name
        if not name:
            raise errors.invalid_argument("Missing model name in request.")
        with self._lock:
            model = self._models.get(name)
            records = dict(model.records) if model is not None else {}
            choice = model_spec.WhichOneof("version_choice")
            if choice == "version_label":
                versions = [self._version_for_label(model, model_spec.version_label)]
            elif choice == "version":
                versions = [model_spec.version.value]
            else:
                versions = sorted(records, reverse=True)
        if not records:
            raise errors.not_found(f"Could not find any versions of model {name}")
        response = get_model_status_pb2.GetModelStatusResponse()
        for version in versions:
            record = records.get(version)
            if record is None:
                raise errors.not_found(f"Could not find version {version} of model {name}")
            status = response.model_version_status.add()
            status.version = version
            status.state = record.state
            status.status.error_code = record.code.value[0]
            status.status.error_message = record.message
        return response

    def model_names(self) -> List[str]:
        with self._lock:
            return sorted(self._models)

    def available_versions(self, name: str) -> List[int]:
        with self._lock:
            model = self._models.get(name)
            return sorted(model.servables) if model is not None else []
