"""Typed configuration: YAML -> nested dataclasses -> ``--set a.b=v`` overrides -> validation.

Unknown keys are errors naming the dotted field. The resolved config (``to_dict``) is written
beside every run's outputs and into every checkpoint. Each stage takes the section it needs.

* ``sections.py``: the sections shared by both stages (data, augment, model, objective, train, run);
* ``stages.py``: ``PretrainConfig`` and ``FinetuneConfig``, which compose them;
* ``loading.py``: reading, overriding, validating and writing them.
"""

from mtscale.config.loading import (
    apply_overrides,
    from_dict,
    get_dotted,
    load_config,
    read_yaml_mapping,
    save_config,
    set_dotted,
    to_dict,
)
from mtscale.config.sections import (
    AugmentConfig,
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    RunConfig,
    TrainConfig,
)
from mtscale.config.stages import FinetuneConfig, PretrainConfig, PretrainTrainConfig

__all__ = ["AugmentConfig", "DataConfig", "FinetuneConfig", "ModelConfig", "ObjectiveConfig", "PretrainConfig",
           "PretrainTrainConfig", "RunConfig", "TrainConfig", "apply_overrides", "from_dict", "get_dotted",
           "load_config", "read_yaml_mapping", "save_config", "set_dotted", "to_dict"]
