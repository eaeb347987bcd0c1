"""One version folder per day in TF Serving's base directory, pushed so that a kill at any point
leaves either nothing or a complete version (the ExactlyOncePusher's executor calls `push`; see
components/exactly_once_pusher.py for the rules). No TFX here: `poso versions` reads the markers.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import socket
from typing import Any, Dict, List, Optional

from components import fault_injection

MARKER = "PUSH.json"
TEMPORARY_PREFIX = ".push-"
_REVISIONS = 100
# The files whose bytes identify a SavedModel: the graph and the variables' index, which holds
# every variable's checksum (the data shards themselves need not be read).
_FINGERPRINT_FILES = ("saved_model.pb", os.path.join("variables", "variables.index"))


def day_versions(base_directory: str, date: datetime.date) -> List[int]:
    """The complete version numbers of `date` in the base directory, oldest revision first."""
    first = int(date.strftime("%Y%m%d")) * _REVISIONS
    if not os.path.isdir(base_directory):
        return []
    return sorted(int(name) for name in os.listdir(base_directory)
                  if name.isdigit() and first <= int(name) < first + _REVISIONS)


def read_marker(version_dir: str) -> Dict[str, Any]:
    try:
        with open(os.path.join(version_dir, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def model_fingerprint(model_dir: str) -> str:
    digest = hashlib.sha256()
    for name in _FINGERPRINT_FILES:
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            digest.update(name.encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def push(model_dir: str, base_directory: str, date: datetime.date, pinned: Optional[int] = None) -> Dict[str, Any]:
    """Pushes `model_dir` as `date`'s version; returns {version, destination, push: copied|adopted}.
    A version pinned by `poso rollback` (`pinned`) is never removed, even when replaced."""
    os.makedirs(base_directory, exist_ok=True)
    first = int(date.strftime("%Y%m%d")) * _REVISIONS
    for name in os.listdir(base_directory):  # leftovers of this day's pushes that were killed
        if name.startswith(TEMPORARY_PREFIX) and name[len(TEMPORARY_PREFIX):].isdigit() and \
                first <= int(name[len(TEMPORARY_PREFIX):]) < first + _REVISIONS:
            logging.warning("Removing %s, left by a push that did not finish", name)
            shutil.rmtree(os.path.join(base_directory, name))
    fingerprint = model_fingerprint(model_dir)
    existing = day_versions(base_directory, date)
    same = [v for v in existing if read_marker(os.path.join(base_directory, str(v))).get("model_fingerprint") == fingerprint]
    if same:
        version, mode = same[-1], "adopted"
        logging.info("Version %d already holds this model for %s: adopted, not pushed again", version, date)
    else:
        version, mode = (existing[-1] + 1 if existing else first), "copied"
        if version >= first + _REVISIONS:
            raise RuntimeError(f"{date}: {_REVISIONS} revisions pushed already; remove old ones from {base_directory}")
        temporary = os.path.join(base_directory, f"{TEMPORARY_PREFIX}{version}")
        # saved_model.pb last: it is what marks a SavedModel as complete (as TFX's Pusher does).
        shutil.copytree(model_dir, temporary, ignore=shutil.ignore_patterns("saved_model.pb"))
        shutil.copy2(os.path.join(model_dir, "saved_model.pb"), os.path.join(temporary, "saved_model.pb"))
        fault_injection.reached("Pusher:copied")
        with open(os.path.join(temporary, MARKER), "w") as f:
            json.dump({"date": date.isoformat(), "version": version, "model_fingerprint": fingerprint,
                       "source": model_dir, "host": socket.gethostname(), "pid": os.getpid(),
                       "pushed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}, f)
        _fsync_tree(temporary)
        os.rename(temporary, os.path.join(base_directory, str(version)))
        fault_injection.reached("Pusher:renamed")
    for other in existing:
        if other not in (version, pinned):
            logging.info("Removing version %d of %s: replaced by version %d", other, date, version)
            shutil.rmtree(os.path.join(base_directory, str(other)))
    return {"version": version, "destination": os.path.join(base_directory, str(version)), "push": mode}
