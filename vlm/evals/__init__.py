"""Evaluations: callables `evaluator(params) -> {name: value}` built from the config by name.

config.evals = {'<name>': dict(type='zeroshot'|'retrieval'|'captioning'|'probe'|'classify'|'vqa_generate'|'text_to_image'|'grounding'|'region_qa', every=N,
                              split='test', ...)}
"""

from vlm.evals.base import EVALS, build_evals
from vlm.evals import (
  captioning,
  classification,
  contrastive,
  grounding,
  probe,
  reconstruction,  # noqa: F401
  text_to_image,
  vqa,
)  # (imported to register them)

__all__ = ["EVALS", "build_evals"]
