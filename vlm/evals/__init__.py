"""Evaluations: callables `evaluator(params) -> {name: value}` built from the config by name.

config.evals = {'<name>': dict(type=TYPE, every=N, split='test', ...)}, TYPE one of 'zeroshot', 'retrieval',
'captioning', 'probe', 'classify', 'vqa_generate', 'text_to_image', 'grounding', 'region_qa'.
"""

from vlm.evals.base import EVALS, build_evals
from vlm.evals import (  # noqa: F401 (imported to register them)
  captioning,
  classification,
  contrastive,
  grounding,
  probe,
  reconstruction,
  text_to_image,
  vqa,
)

__all__ = ["EVALS", "build_evals"]
