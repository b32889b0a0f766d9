"""Evaluations: callables `evaluator(params) -> {name: value}` built from the config by name.

config.evals = {'<name>': dict(type='zeroshot'|'retrieval'|'captioning'|'probe'|'classify'|'vqa_generate'|'text_to_image', every=N,
                              split='test', ...)}
"""

from vlm.evals.base import EVALS, build_evals
from vlm.evals import captioning, classification, contrastive, probe, reconstruction, text_to_image, vqa  # noqa: F401  (register them)

__all__ = ["EVALS", "build_evals"]
