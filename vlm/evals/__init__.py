"""Evaluations: callables `evaluator(params) -> {name: value}` built from the config by name.

config.evals = {'<name>': dict(type='zeroshot'|'retrieval', every=N, split='test', ...)}
"""

from vlm.evals.base import EVALS, build_evals
from vlm.evals import contrastive  # noqa: F401  (registers 'zeroshot', 'retrieval')

__all__ = ["EVALS", "build_evals"]
