"""MODELS: the model registry (`config.model_name` -> a linen Module class), and PREDICT_FNS: what
each family's users call on it.

Its own module so that a model that builds another by name (VisionLanguageModel's `vision_model`)
reads the registry without importing the package that imports every model. vlm/models/__init__.py
registers the families.
"""

from collections.abc import Callable
from typing import Any

from flax import linen as nn

from vlm.registry import Registry

MODELS: Registry = Registry("model")
"""Model families. Configs name them through MODELS: `config.model_name = 'two_tower'`."""

PredictFns = dict[str, Callable[..., Any]]

PREDICT_FNS: Registry = Registry("predict functions")
"""model_name -> get_all(model) -> {name: fn}: the jit-able functions evaluators, vlm.predict and
vlm.curation call (big_vision's predict_fns), each fn(params, ...) bound to the model. Names in use:
embed_image(params, images) -> z, embed_text(params, tokens) -> z, scale_and_bias(params) -> (scale,
bias or None), pair_similarity(z_img, z_txt) -> [I, J] (models whose pair score is not a dot product),
image_features(params, images) -> {name: [B, T, D]}, caption(params, images, ...) and generate(params,
images, prompt, ...) -> vlm.decoding.DecodeOutput, generate_guided (the same with contrast_images),
logits(params, *inputs), vqa_logits(params, images, questions), autoencode(params, images) -> (recon,
codes) with codebook_size(), generate_images(params, text, image_hw, ...), reconstruct(params, images)."""


def predict_fns(model: nn.Module) -> PredictFns:
  """The model's predict functions (PREDICT_FNS of its class, or of the nearest registered base class
  that has some); {} for a family that registered none."""
  for cls in type(model).__mro__:
    for name, entry in MODELS.items():
      if entry is cls and name in PREDICT_FNS:
        return PREDICT_FNS.get(name)(model)
  return {}


def require(fns: PredictFns, names: tuple[str, ...], where: str) -> None:
  """ValueError naming `where` (e.g. 'evals.zeroshot') when a predict function in `names` is missing."""
  missing = [n for n in names if n not in fns]
  if missing:
    have = ", ".join(sorted(fns)) or "none"
    raise ValueError(f"{where} needs the predict function(s) {', '.join(missing)}; this model has: {have}")
