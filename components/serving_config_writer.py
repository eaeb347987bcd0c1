"""ServingConfigWriter: the pipeline's last step, keeping models.config beside the serving base
directory after each push (components/serving_config.py generates it and reads the pin)."""

import logging

from tfx.dsl.component.experimental.annotations import InputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types import standard_artifacts

from components.serving_config import write_models_config


@component
def ServingConfigWriter(pushed_model: InputArtifact[standard_artifacts.PushedModel],
                        models_config_path: Parameter[str], model_name: Parameter[str],
                        base_path: Parameter[str], pin_path: Parameter[str]) -> None:
    """Keeps TF Serving's models.config (model_config_list) beside the base directory, serving
    the latest version unless `poso rollback` pinned one."""
    if not pushed_model.get_int_custom_property("pushed"):
        logging.info("Model not pushed; %s left as it is", models_config_path)
        return
    pinned = write_models_config(models_config_path, model_name, base_path, pin_path)
    if pinned is not None:
        logging.warning("Version %s pushed but not served: version %d is pinned by `poso rollback` "
                        "(lift the pin with `poso rollback --release` or `poso run --unpin`)",
                        pushed_model.get_string_custom_property("pushed_version"), pinned)
