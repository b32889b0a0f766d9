"""Training objectives: `objective(model, params, batch, *, rng, train) -> (loss, metrics)`.

Configs pick one by name (`config.objective_name`) with kwargs from `config.objective`.
"""

from vlm.objectives.base import OBJECTIVES, build_objective
from vlm.objectives import blip2, classification, coca, contrastive, early_fusion, flava, lm, vlmo, vq  # noqa: F401  (register them)

__all__ = ["OBJECTIVES", "build_objective"]
