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

  input_key: a batch key, or a tuple of keys passed to the model in order. method: the model
  method returning the logits or (logits, aux) (None: the model's __call__); e.g. VQA as answer
  classification: input_key ('image', 'question'), method 'vqa_logits', label_key 'answer_label'.
  Examples with a negative label (the embedded scenes mark 'no motion' with -1, answers outside
  data.answer_vocab get -1) count in neither the loss nor the accuracy. label_smoothing: mass
  spread uniformly over the C classes.
  """

  input_key: str | tuple[str, ...] = "frames"
  label_key: str = "motion"
  method: str | None = None
  label_smoothing: float = 0.0
  mesh: Mesh | None = None

  def _inputs(self, batch) -> tuple:
    keys = (self.input_key,) if isinstance(self.input_key, str) else tuple(self.input_key)
    missing = [k for k in (*keys, self.label_key) if k not in batch]
    if missing:
      raise ValueError(
        f"objective: the batch has no {missing} (has {sorted(batch)}); check objective.input_key / "
        "label_key and the data config (extra_text_keys, answer_vocab, with_frames)"
      )
    return tuple(batch[k] for k in keys)

  def init_args(self, batch) -> tuple:
    """Example inputs for model.init (one row of the batch)."""
    return tuple(x[:1] for x in self._inputs(batch))

  def __call__(self, model: nn.Module, params, batch, *, rng, train: bool):
    method = getattr(type(model), self.method) if self.method else None
    out = model.apply({"params": params}, *self._inputs(batch), train=train, rngs={"dropout": rng}, method=method)
    logits = (out[0] if isinstance(out, tuple) else out).astype(jnp.float32)
    labels = batch[self.label_key]
    valid = (labels >= 0).astype(jnp.float32)
    targets = jax.nn.one_hot(jnp.maximum(labels, 0), logits.shape[-1])
    if self.label_smoothing:
      targets = optax.smooth_labels(targets, self.label_smoothing)
    n = jnp.maximum(valid.sum(), 1.0)
    loss = jnp.sum(optax.softmax_cross_entropy(logits, targets) * valid) / n
    accuracy = jnp.sum((jnp.argmax(logits, axis=-1) == labels) * valid) / n
    return loss, {"accuracy": accuracy}
