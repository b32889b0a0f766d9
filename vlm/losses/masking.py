"""Masking for masked language / image modelling (BERT, BEiT, VLMo, FLAVA) and its loss.

Masks are drawn inside the jitted train step from the step's RNG over the global batch [B, ...],
so they do not depend on how the batch is sharded.
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from vlm.losses.captioning import caption_loss


def mask_tokens(
  rng: jax.Array,
  tokens: jax.Array,
  *,
  mask_id: int,
  vocab_size: int,
  rate: float = 0.15,
  special_ids: Sequence[int] = (0, 1, 3),
  replace: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> tuple[jax.Array, jax.Array]:
  """BERT masking (Devlin et al. 2019, sec. 3.1): each non-special token is chosen with probability
  `rate`; a chosen token becomes [MASK] (80%), a random token (10%) or stays (10%).

  tokens [B, T] int -> (inputs [B, T] with the replacements, chosen [B, T] bool: the positions the
  loss predicts). special_ids (pad, eos, bos by default) are never chosen; random replacements
  are drawn from [0, vocab_size) excluding nothing (as BERT). mask_id is usually an id past the
  tokenizer's vocabulary (the text embedding then has vocab_size + 1 rows).
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"masking rate must be in [0, 1], got {rate}")
  p_mask, p_random, p_keep = replace
  if abs(p_mask + p_random + p_keep - 1.0) > 1e-6:
    raise ValueError(f"replace probabilities must sum to 1, got {replace}")
  k_choose, k_how, k_rand = jax.random.split(rng, 3)
  eligible = jnp.ones(tokens.shape, bool)
  for s in special_ids:
    eligible &= tokens != s
  chosen = eligible & jax.random.bernoulli(k_choose, rate, tokens.shape)
  u = jax.random.uniform(k_how, tokens.shape)
  random_tokens = jax.random.randint(k_rand, tokens.shape, 0, vocab_size, dtype=tokens.dtype)
  inputs = jnp.where(chosen & (u < p_mask), jnp.asarray(mask_id, tokens.dtype), tokens)
  inputs = jnp.where(chosen & (u >= p_mask) & (u < p_mask + p_random), random_tokens, inputs)
  return inputs, chosen


def random_patch_mask(rng: jax.Array, batch: int, num_patches: int, ratio: float) -> jax.Array:
  """[batch, num_patches] bool with exactly round(ratio * num_patches) True per row, uniformly placed.

  BEiT masks about 40% of the patches (Bao et al. 2022, sec. 2.2); FLAVA and VLMo follow it.
  """
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
  n = int(round(ratio * num_patches))
  noise = jax.random.uniform(rng, (batch, num_patches))
  rank = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
  return rank < n


def blockwise_patch_mask(
  rng: jax.Array,
  batch: int,
  grid: tuple[int, int],
  ratio: float,
  min_block: int = 4,
  max_aspect: float = 3.0,
  max_tries: int = 64,
) -> jax.Array:
  """BEiT's blockwise masking (Bao et al. 2022, Algorithm 1), [batch, gh * gw] bool.

  Adds random rectangles (area >= min_block patches, aspect ratio in [1/max_aspect, max_aspect])
  until about ratio * gh * gw patches are masked; then tops up with random single patches so
  every row masks exactly round(ratio * gh * gw) patches (fixed-size masks keep shapes static).
  """
  gh, gw = grid
  n = gh * gw
  target = int(round(ratio * n))
  ys = jnp.arange(gh)[:, None]
  xs = jnp.arange(gw)[None, :]

  def one(key):
    def body(i, state):
      mask, key = state
      key, ka, kr, ky, kx = jax.random.split(key, 5)
      remaining = target - mask.sum()
      area = jax.random.uniform(ka, minval=min_block, maxval=jnp.maximum(remaining, min_block) + 1e-3)
      log_r = jax.random.uniform(kr, minval=-jnp.log(max_aspect), maxval=jnp.log(max_aspect))
      h = jnp.clip(jnp.round(jnp.sqrt(area * jnp.exp(log_r))), 1, gh).astype(jnp.int32)
      w = jnp.clip(jnp.round(jnp.sqrt(area / jnp.exp(log_r))), 1, gw).astype(jnp.int32)
      top = jax.random.randint(ky, (), 0, gh - h + 1)
      left = jax.random.randint(kx, (), 0, gw - w + 1)
      block = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)
      new = mask | block
      ok = (new.sum() <= target) & (remaining > 0)
      return jnp.where(ok, new, mask), key

    key, k_fill = jax.random.split(key)
    mask, _ = jax.lax.fori_loop(0, max_tries, body, (jnp.zeros((gh, gw), bool), key))
    mask = mask.reshape(n)
    # Top up (never remove): rank the unmasked patches randomly and take the first ones needed.
    noise = jax.random.uniform(k_fill, (n,)) + mask * 2.0  # masked patches rank last
    rank = jnp.argsort(jnp.argsort(noise))
    return mask | (rank < target - mask.sum())

  return jax.vmap(one)(jax.random.split(rng, batch))


def masked_prediction_loss(
  logits: jax.Array, targets: jax.Array, mask: jax.Array, *, label_smoothing: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy of logits [B, T, V] against targets [B, T], averaged over the masked positions only.

  The same token-mean cross-entropy as captioning (vlm.losses.caption_loss); metrics
  'accuracy' (on masked positions) and 'masked_fraction'.
  """
  loss, m = caption_loss(logits, targets, mask, label_smoothing=label_smoothing)
  return loss, {"accuracy": m["token_accuracy"], "masked_fraction": mask.astype(jnp.float32).mean()}
