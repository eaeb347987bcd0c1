"""`poso versions`, `poso rollback` and `poso serving-config` on a serving directory laid out as
the Pusher writes it; the pin holds across the config the pipeline writes after a push."""

import json
import os

import pytest

from components import serving_config
from pipeline import cli, config as config_lib
from serving import config as serving_config_lib

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _push(home, version, day=None, variant="poso_all"):
    """What the Pusher and the end-of-run summary leave for one pushed version."""
    folder = home / "serving" / config_lib.MODEL_NAME / str(version)
    folder.mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"")
    if day:
        (home / "runs").mkdir(exist_ok=True)
        (home / "runs" / f"{day}.json").write_text(json.dumps({"date": day, "pushed": True, "pushed_version": version,
                                                                "variant": variant}))


def _pipeline_writes_config(home):
    """What ServingConfigWriter does after a push."""
    cfg = config_lib.RunConfig(date=None, home=str(home))
    serving_config.write_models_config(cfg.models_config_path, config_lib.MODEL_NAME, cfg.serving_model_dir,
                                       cfg.pin_path)


def _served(home):
    cfg = config_lib.RunConfig(date=None, home=str(home))
    config = serving_config_lib.load_model_server_config(cfg.models_config_path)
    model = serving_config_lib.find_model(config, config_lib.MODEL_NAME)
    return serving_config_lib.aspired_versions(serving_config_lib.list_versions(cfg.serving_model_dir), model)


def _versions(home, capsys):
    assert cli.main(["versions", "--home", str(home), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_rollback_pins_a_version_that_later_pushes_do_not_undo(tmp_path, capsys):
    home = tmp_path / "home"
    _push(home, 1700000000, "2022-04-15")
    _push(home, 1700086400, "2022-04-16", variant="pin")
    _pipeline_writes_config(home)
    assert _served(home) == {1700086400}

    assert cli.main(["rollback", "1700000000", "--home", str(home)]) == 0
    assert "now serves version 1700000000 (pinned" in capsys.readouterr().out
    assert _served(home) == {1700000000}
    rows = _versions(home, capsys)
    assert [(r["version"], r["pushed_by_run"], r["model"], r["serving"], r["pinned"]) for r in rows] == [
        (1700000000, "2022-04-15", "poso_all", True, True), (1700086400, "2022-04-16", "pin", False, False)]
    # The table says the same.
    assert cli.main(["versions", "--home", str(home)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["VERSION", "PUSHED", "BLESSED", "BY", "RUN", "MODEL", "SERVING"]
    assert "pin" in table[2].split() and "(pinned by poso rollback)" in table[1]

    _push(home, 1700172800, "2022-04-17")   # the next daily run pushes
    _pipeline_writes_config(home)
    assert _served(home) == {1700000000}

    assert cli.main(["rollback", "--release", "--home", str(home)]) == 0
    assert _served(home) == {1700172800}
    assert not os.path.exists(config_lib.RunConfig(date=None, home=str(home)).pin_path)


def test_rollback_to_a_version_never_pushed_is_refused_naming_the_pushed_ones(tmp_path):
    _push(tmp_path, 1700000000)
    with pytest.raises(SystemExit, match=r"version 5 is not in .* \(pushed: 1700000000\)"):
        cli.main(["rollback", "5", "--home", str(tmp_path)])
    assert not os.path.exists(config_lib.RunConfig(date=None, home=str(tmp_path)).pin_path)


def test_rollback_needs_a_version_or_release(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["rollback", "--home", str(tmp_path)])
    assert "one of the arguments version --release is required" in capsys.readouterr().err


def test_deploy_models_config_is_the_generated_one(capsys):
    assert cli.main(["serving-config", "--base-path", "/models/poso_ranking"]) == 0
    with open(os.path.join(PROJECT_DIR, "deploy", "models.config")) as f:
        assert f.read() == capsys.readouterr().out


def test_serving_config_carries_the_pin_of_a_home(tmp_path, capsys):
    _push(tmp_path, 1700000000)
    assert cli.main(["rollback", "1700000000", "--home", str(tmp_path)]) == 0
    capsys.readouterr()
    assert cli.main(["serving-config", "--base-path", "/models/poso_ranking", "--home", str(tmp_path)]) == 0
    config = serving_config_lib.parse_model_server_config(capsys.readouterr().out)
    model = serving_config_lib.find_model(config, config_lib.MODEL_NAME)
    assert model.base_path == "/models/poso_ranking" and list(model.model_version_policy.specific.versions) == [1700000000]
