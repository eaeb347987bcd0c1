"""The one source of truth for feature names, types, vocabularies, PC buckets and tasks.

Everything else (raw log readers, the AVC Beam step, the TFX schema, the Transform
preprocessing_fn, the model's inputs and both serving signatures) derives from the
declarations in `specs`. No other module spells a feature name.
"""

from feature_specs.specs import *  # noqa: F401,F403
from feature_specs.specs import __all__  # noqa: F401
