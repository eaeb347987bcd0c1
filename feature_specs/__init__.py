"""The one source of truth for feature names, types, vocabularies, PC buckets and tasks.

Everything else (raw log readers, the AVC Beam step, the TFX schema, the Transform
preprocessing_fn, the model's inputs and both serving signatures) derives from the
declarations in `specs` (KuaiRand, `specs.KUAIRAND`) or, for the paper's public-data
protocol, `movielens.MOVIELENS`. No other module spells a feature name.
"""

from feature_specs.specs import *  # noqa: F401,F403
from feature_specs.specs import __all__ as _specs_all

__all__ = list(_specs_all) + ["feature_set"]


def feature_set(name: str) -> "FeatureSet":  # noqa: F405
    """The declared feature set called `name` ("kuairand" or "movielens")."""
    from feature_specs.movielens import MOVIELENS

    known = {KUAIRAND.name: KUAIRAND, MOVIELENS.name: MOVIELENS}  # noqa: F405
    if name not in known:
        raise ValueError(f"unknown feature set {name!r}; known: {sorted(known)}")
    return known[name]
