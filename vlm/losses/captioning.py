"""Captioning (next-token) cross-entropy with padding ignored."""

import jax
import jax.numpy as jnp
import optax


def caption_loss(
  logits: jax.Array, targets: jax.Array, mask: jax.Array, *, label_smoothing: float = 0.0, z_loss: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Token-averaged cross-entropy of logits [B, T, V] against targets [B, T] where mask [B, T] is True.

  label_smoothing: mass spread uniformly over the vocabulary. z_loss: weight of log(Z)^2 (PaLM,
  Chowdhery et al. 2022 sec. 5), which keeps the softmax normaliser near 1.
  Metrics: token_accuracy (argmax == target on masked tokens) and the mean log(Z).
  """
  logits = logits.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  vocab = logits.shape[-1]
  onehot = jax.nn.one_hot(targets, vocab, dtype=jnp.float32)
  if label_smoothing:
    onehot = onehot * (1.0 - label_smoothing) + label_smoothing / vocab
  log_z = jax.nn.logsumexp(logits, axis=-1)
  per_token = optax.softmax_cross_entropy(logits, onehot)
  if z_loss:
    per_token = per_token + z_loss * jnp.square(log_z)
  n = jnp.maximum(mask.sum(), 1.0)
  loss = jnp.sum(per_token * mask) / n
  accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) * mask) / n
  return loss, {"token_accuracy": accuracy, "log_z": jnp.sum(log_z * mask) / n}
