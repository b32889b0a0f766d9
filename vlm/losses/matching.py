"""Image-text matching (ITM) with hard negatives mined from the global batch (ALBEF, VLMo, BLIP).

For each pair i of the global batch, one negative text is drawn from softmax_j(scale * <zimg_i,
ztxt_j>) and one negative image from softmax_j(scale * <ztxt_i, zimg_j>), j over the whole global
batch (every device's examples) except i (VLMo, Bao et al. 2022, sec. 2.2; ALBEF, Li et al.
2021, sec. 3.2). Runs inside `jax.shard_map` over the mesh's data axes: each device gathers the
embeddings (and, in `take_rows`, the inputs of the chosen negatives) from all others, like the
all-gather contrastive loss.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from vlm import parallel
from vlm.losses.contrastive import all_gather_batch


def hard_negative_indices(
  zimg: jax.Array,
  ztxt: jax.Array,
  rng: jax.Array,
  *,
  scale: jax.Array | float = 1.0,
  tokens: jax.Array | None = None,
  hard: bool = True,
  mesh: Mesh | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Global indices of one negative text and one negative image per pair.

  zimg, ztxt [B, D] (global, sharded over the mesh's data axes) -> (neg_text [B], neg_image [B]),
  or zimg [B, Q, D] with BLIP-2's similarity max_q <zimg[i, q], ztxt[j]> (one embedding per query),
  int32 indices into the global batch, never i itself. hard=False draws uniformly (random
  negatives). tokens [B, T]: if given, pairs whose text equals pair i's text are not drawn either
  (they would be false negatives: the same caption also describes image i); a row where that
  leaves nothing falls back to excluding only i. No gradient flows through the sampling.
  """
  if zimg.shape[0] < 2:
    raise ValueError(f"hard negatives need a global batch of at least 2 pairs, got {zimg.shape[0]}")
  axes = parallel.data_axes(mesh)
  zimg, ztxt = jax.lax.stop_gradient(zimg.astype(jnp.float32)), jax.lax.stop_gradient(ztxt.astype(jnp.float32))
  scale = jax.lax.stop_gradient(jnp.asarray(scale, jnp.float32))
  if tokens is None:
    tokens = jnp.zeros((zimg.shape[0], 0), jnp.int32)

  def per_device(zi, zt, tok, key, s):
    b = zi.shape[0]
    index = jax.lax.axis_index(axes) if axes else 0
    zi_all, zt_all, tok_all = (all_gather_batch(x, axes) for x in (zi, zt, tok))
    rows = index * b + jnp.arange(b)
    cols = jnp.arange(zi_all.shape[0])
    positive = cols[None, :] == rows[:, None]
    same_text = jnp.all(tok[:, None, :] == tok_all[None, :, :], axis=-1) if tok.shape[1] else positive
    excluded = positive | same_text
    excluded = jnp.where(jnp.all(excluded, axis=1, keepdims=True), positive, excluded)
    key = jax.random.fold_in(key, index)
    k_txt, k_img = jax.random.split(key)
    i2t, t2i = similarities(zi, zt, zi_all, zt_all)

    def draw(k, logits):
      logits = (s * logits if hard else jnp.zeros_like(logits)).astype(jnp.float32)
      return jax.random.categorical(k, jnp.where(excluded, -jnp.inf, logits), axis=-1).astype(jnp.int32)

    return draw(k_txt, i2t), draw(k_img, t2i)

  spec = P(axes if axes else None)
  img_spec = P(axes if axes else None, *([None] * (zimg.ndim - 1)))
  return parallel.shard_map_or_call(
    per_device, mesh, (zimg, ztxt, tokens, rng, scale), (img_spec, P(axes, None), P(axes, None), P(), P()), (spec, spec)
  )


def similarities(zi: jax.Array, zt: jax.Array, zi_all: jax.Array, zt_all: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Local rows against the global batch: (i2t [b, B], t2i [b, B]). zi [b, D] or [b, Q, D] (max over
  queries, BLIP-2 sec. 3.2), zt [b, D]; zi_all / zt_all the gathered global batch."""
  if zi.ndim == 3:
    return jnp.einsum("iqe,je->ijq", zi, zt_all).max(-1), jnp.einsum("ie,jqe->ijq", zt, zi_all).max(-1)
  return zi @ zt_all.T, zt @ zi_all.T


def take_rows(x: Any, index: jax.Array, mesh: Mesh | None = None) -> Any:
  """x[index] for a pytree of global arrays [B, ...] and global indices [B], across devices.

  Each device gathers every device's rows and keeps the ones its local indices name (the
  negatives' images or tokens for ITM).
  """
  axes = parallel.data_axes(mesh)

  def per_device(xs, idx):
    return jax.tree.map(lambda a: jnp.take(all_gather_batch(a, axes), idx, axis=0), xs)

  specs = jax.tree.map(lambda a: P(axes, *([None] * (a.ndim - 1))), x)
  return parallel.shard_map_or_call(per_device, mesh, (x, index), (specs, P(axes)), specs)


def itm_loss(pos_logits: jax.Array, neg_logits: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Binary matching cross-entropy: pos_logits [B, 2] (label 1), neg_logits [N, 2] (label 0).

  The mean over all B + N pairs (VLMo and ALBEF weight each pair equally). Metrics: accuracy on
  all pairs and on the positives.
  """
  logits = jnp.concatenate([pos_logits, neg_logits]).astype(jnp.float32)
  labels = jnp.concatenate([jnp.ones(pos_logits.shape[0], jnp.int32), jnp.zeros(neg_logits.shape[0], jnp.int32)])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  pred = jnp.argmax(logits, -1)
  return loss, {"accuracy": jnp.mean(pred == labels), "pos_accuracy": jnp.mean(pred[: pos_logits.shape[0]] == 1)}
