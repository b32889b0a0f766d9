"""Supervised classification: softmax cross-entropy of `model(inputs) -> (logits, aux)` against labels."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vlm.objectives.base import OBJECTIVES


@OBJECTIVES.register("classification")
@dataclasses.dataclass(frozen=True)
class Classification:
  """Cross-entropy of logits [B, C] against batch[label_key] [B] (e.g. 'frames' -> 'motion').

  Examples with a negative label (the embedded scenes mark 'no motion' with -1) count in
  neither the loss nor the accuracy. label_smoothing: mass spread uniformly over the C classes.
  """

  input_key: str = "frames"
  label_key: str = "motion"
  label_smoothing: float = 0.0
  mesh: Mesh | None = None

  def init_args(self, batch) -> tuple:
    """Example inputs for model.init (one row of the batch)."""
    return (batch[self.input_key][:1],)

  def __call__(self, model: nn.Module, params, batch, *, rng, train: bool):
    logits, _ = model.apply({"params": params}, batch[self.input_key], train=train, rngs={"dropout": rng})
    logits = logits.astype(jnp.float32)
    labels = batch[self.label_key]
    valid = (labels >= 0).astype(jnp.float32)
    targets = jax.nn.one_hot(jnp.maximum(labels, 0), logits.shape[-1])
    if self.label_smoothing:
      targets = optax.smooth_labels(targets, self.label_smoothing)
    n = jnp.maximum(valid.sum(), 1.0)
    loss = jnp.sum(optax.softmax_cross_entropy(logits, targets) * valid) / n
    accuracy = jnp.sum((jnp.argmax(logits, axis=-1) == labels) * valid) / n
    return loss, {"accuracy": accuracy}
