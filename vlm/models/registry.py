"""MODELS: the model registry (`config.model_name` -> a linen Module class).

Its own module so that a model that builds another by name (VisionLanguageModel's `vision_model`)
reads the registry without importing the package that imports every model. vlm/models/__init__.py
registers the families.
"""

from vlm.registry import Registry

MODELS: Registry = Registry("model")
