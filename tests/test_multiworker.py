"""Training across workers: two processes on 127.0.0.1 with TF_CONFIG train one model together.

`models.trainer.train_and_export` (what the TFX Trainer's run_fn calls) picks
MultiWorkerMirroredStrategy from TF_CONFIG, as TFX's Trainer on Vertex AI worker pools sets it.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from models import trainer
from pipeline import config as config_lib

TINY = dict(embedding_dim=4, mlp_units=(16,), expert_units=(8,), tower_units=(4,), num_heads=2, head_dim=4,
            gate_hidden_units=4, pc_embedding_dim=3, num_experts=2, num_value_projections=2, learning_rate=0.02)

_WORKER = """
import faulthandler, json, sys
faulthandler.dump_traceback_later(540, exit=True)  # a hung collective shows where, instead of a bare timeout
import numpy as np
import tensorflow as tf
import raw_examples as rx
from models import export, model, trainer
args = json.loads(sys.argv[1])
result = trainer.train_and_export(
    args["train"], args["eval"], args["transform"], args["export"],
    model.make_config("poso_all", **args["tiny"]), batch_size=32, epochs=3, train_steps=30, eval_steps=1,
    verbose=0, seed=1)
served = []
if args["chief"]:  # the chief's export answers as a served model would
    loaded = tf.saved_model.load(args["export"])
    rows = rx.make_raw_rows(4, seed=5)
    outputs = loaded.signatures[export.SERVING_DEFAULT](examples=tf.constant(rx.serialize_all(rows)))
    served = np.stack([outputs[name].numpy().reshape(-1) for name in sorted(outputs)])
np.savez(args["out"], *[v.numpy() for v in sorted(result.model.variables, key=lambda v: v.name)], served=served,
         loss=np.array(result.history["loss"]), collective=isinstance(result.model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy))
"""


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# Examples and a real tf.Transform output, made in a child: this process then never runs TensorFlow
# or Beam itself (their finalizers at interpreter exit are not what this test is about).
_PREPARE = """
import json, os, sys
import raw_examples as rx
root = sys.argv[1]
rows, transform_dir = rx.shared_transform(root, n=256)
paths = {split: rx.write_gzip_tfrecords(os.path.join(root, "examples", split, "data.gz"), rx.serialize_all(part))
         for split, part in (("train", rows[:-32]), ("eval", rows[-32:]))}
print(json.dumps({"transform": transform_dir, **paths}), flush=True)
os._exit(0)  # a process that ran only tf.Transform's Beam analysis can crash in its exit-time garbage collection
"""


def _child_env(**extra):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([config_lib.PROJECT_DIR, tests_dir]), **extra}


def test_distribution_strategy_follows_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert not isinstance(trainer.distribution_strategy(), tf.distribute.MultiWorkerMirroredStrategy)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert not isinstance(trainer.distribution_strategy(), tf.distribute.MultiWorkerMirroredStrategy)
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not JSON"):
        trainer.distribution_strategy()


def test_two_workers_train_one_model_and_only_the_chief_exports(tmp_path):
    prepared = subprocess.run([sys.executable, "-c", _PREPARE, str(tmp_path)], env=_child_env(),
                              cwd=config_lib.PROJECT_DIR, capture_output=True, text=True, timeout=600)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    data = json.loads(prepared.stdout.strip().splitlines()[-1])
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    export_dir = tmp_path / "serving" / "model"
    workers = []
    for index in range(2):
        args = {"train": data["train"], "eval": data["eval"], "transform": data["transform"], "chief": index == 0,
                "export": str(export_dir), "tiny": TINY, "out": str(tmp_path / f"worker{index}.npz")}
        env = _child_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        log = open(tmp_path / f"worker{index}.log", "w")
        workers.append((subprocess.Popen([sys.executable, "-c", _WORKER, json.dumps(args)], env=env,
                                         cwd=config_lib.PROJECT_DIR, stdout=log, stderr=subprocess.STDOUT),
                        tmp_path / f"worker{index}.log"))
    try:
        for process, log in workers:
            process.wait(timeout=600)  # the faulthandler above ends a hung worker first
            assert process.returncode == 0, open(log).read()[-4000:]
    finally:
        for process, _ in workers:
            if process.poll() is None:
                process.kill()
                process.wait()

    chief, other = (np.load(tmp_path / f"worker{i}.npz") for i in range(2))
    assert bool(chief["collective"]) and bool(other["collective"]), "both must train under MultiWorkerMirroredStrategy"
    weights = [key for key in chief.files if key.startswith("arr_")]
    assert chief["served"].shape == (4, 4) and np.isfinite(chief["served"]).all()
    assert len(weights) > 10 and weights == [key for key in other.files if key.startswith("arr_")]
    for key in weights:  # all-reduced gradients: both workers end with the same model
        np.testing.assert_allclose(chief[key], other[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert chief["loss"][-1] < chief["loss"][0], chief["loss"]

    assert os.path.exists(export_dir / "saved_model.pb")
    assert os.path.exists(export_dir / "assets.extra" / "model_config.json")
    assert sorted(os.listdir(export_dir.parent)) == ["model"], "the other worker's scratch export must be gone"
