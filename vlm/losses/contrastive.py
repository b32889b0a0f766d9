"""Contrastive image-text losses that span all devices of the data axes.

Two losses, both on logits ``logits[i, j] = scale * <zimg_i, ztxt_j> + bias``:

- ``'softmax'``: CLIP (Radford et al. 2021), symmetric cross-entropy
  ``0.5 * (mean_i CE(logits[i, :], i) + mean_j CE(logits[:, j], j))``.
- ``'sigmoid'``: SigLIP (Zhai et al. 2023, sec. 3.1),
  ``-sum_ij log_sigmoid(l_ij * logits[i, j]) / B`` with ``l = +1`` on the
  diagonal and ``-1`` elsewhere.

Three implementations, chosen by string (see ``LOSSES``):

- ``'local'``: the single-device reference on the whole batch.
- ``'all_gather'``: inside ``jax.shard_map`` each device gathers the other side's
  embeddings and computes its ``[b, B]`` rows (big_vision style).
- ``'ring'``: the text blocks travel around the ring of data devices by
  ``ppermute`` (SigLIP sec. 3.3, "chunked" implementation). Only ``[b, b]`` logit
  blocks ever exist, in the forward *and* the backward pass: both are written by
  hand under ``jax.custom_vjp`` so that autodiff does not save ``n`` blocks.
  Softmax uses an online log-sum-exp; the column LSE travels with its text block
  and arrives home after a full cycle, so one pass gives both directions.

Shapes: ``B`` global batch, ``n`` devices on the data axes, ``b = B / n`` local
batch, ``D`` embedding size. Embeddings come L2-normalised from the model.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

Array = jax.Array
Axes = tuple[str, ...]
# fn(zimg [b, D], ztxt [b, D], scale [], bias [] | None, axes, n) -> loss [].
LossFn = Callable[[Array, Array, Array, Array | None, Axes, int], Array]

KINDS = ("sigmoid", "softmax")
IMPLS = ("all_gather", "ring", "local")


# ----------------------------------------------------------------- helpers --


def _logits(zimg: Array, ztxt: Array, scale: Array, bias: Array | None) -> Array:
  """[bi, D], [bt, D] -> logits [bi, bt]."""
  logits = scale * (zimg @ ztxt.T)
  return logits if bias is None else logits + bias


def _psum(x: Any, axes: Axes) -> Any:
  return jax.lax.psum(x, axes) if axes else x


def all_gather_batch(x: Array, axes: Sequence[str]) -> Array:
  """Inside shard_map: [b, ...] per device -> [B, ...], in device order of ``axes``."""
  axes = tuple(axes)
  return jax.lax.all_gather(x, axes, axis=0, tiled=True) if axes else x


def _axis_index(axes: Axes) -> Array:
  return jax.lax.axis_index(axes) if axes else jnp.int32(0)


def _shift(x: Any, axes: Axes, n: int) -> Any:
  """Sends a pytree of blocks from device k to device k + 1 (mod n)."""
  if n == 1 or not jax.tree.leaves(x):
    return x
  return jax.lax.ppermute(x, axes, [(k, (k + 1) % n) for k in range(n)])


def _ring(
  block: Callable[[Array, Any, Any, bool], tuple[Any, Any]], txt: Array, travel: Any, local: Any, axes: Axes, n: int
) -> tuple[Any, Any]:
  """Visits all n text blocks, in O(b^2) memory per step.

  ``block(txt, travel, local, positives) -> (travel, local)``: ``travel``
  moves with the text block (and is back home on return: n ppermutes),
  ``local`` stays. The own block (positives=True) is done first, outside the
  loop, so that carries enter the loop already device-varying.
  """
  travel, local = block(txt, travel, local, True)

  def body(_, carry):
    txt, travel, local = carry
    txt, travel = _shift((txt, travel), axes, n)
    travel, local = block(txt, travel, local, False)
    return txt, travel, local

  _, travel, local = jax.lax.fori_loop(1, n, body, (txt, travel, local))
  return _shift(travel, axes, n), local


def _cotangent_like(x: Array, ref: Array) -> Array:
  return jnp.reshape(x, jnp.shape(ref)).astype(jnp.result_type(ref))


# ------------------------------------------------------ local references --


def sigmoid_loss(zimg: Array, ztxt: Array, scale: Array | float, bias: Array | float | None = None) -> Array:
  """SigLIP loss (Zhai et al. 2023, sec. 3.1) on one device: [B, D], [B, D] -> []."""
  logits = _logits(zimg, ztxt, scale, bias)
  labels = 2.0 * jnp.eye(zimg.shape[0], dtype=logits.dtype) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / zimg.shape[0]


def softmax_loss(zimg: Array, ztxt: Array, scale: Array | float, bias: Array | float | None = None) -> Array:
  """CLIP loss (Radford et al. 2021) on one device: [B, D], [B, D] -> []."""
  logits = _logits(zimg, ztxt, scale, bias)
  pos = jnp.diagonal(logits)
  row = jax.nn.logsumexp(logits, axis=1) - pos  # image -> text
  col = jax.nn.logsumexp(logits, axis=0) - pos  # text -> image
  return 0.5 * (jnp.mean(row) + jnp.mean(col))


# -------------------------------------------------------------- all-gather --


def _sigmoid_all_gather(zimg, ztxt, scale, bias, axes: Axes, n: int) -> Array:
  """Inside shard_map: [b, D], [b, D] -> global loss [] (rows [b, B] per device)."""
  b = zimg.shape[0]
  logits = _logits(zimg, all_gather_batch(ztxt, axes), scale, bias)  # [b, B]
  cols = jnp.arange(b * n)[None, :]
  rows = _axis_index(axes) * b + jnp.arange(b)[:, None]
  labels = jnp.where(cols == rows, 1.0, -1.0).astype(logits.dtype)
  return _psum(-jnp.sum(jax.nn.log_sigmoid(labels * logits)), axes) / (b * n)


def _softmax_all_gather(zimg, ztxt, scale, bias, axes: Axes, n: int) -> Array:
  """Inside shard_map: local image rows and local text columns, [b, B] each."""
  pos = scale * jnp.sum(zimg * ztxt, axis=-1) + (0.0 if bias is None else bias)
  row = jax.nn.logsumexp(_logits(zimg, all_gather_batch(ztxt, axes), scale, bias), 1)
  col = jax.nn.logsumexp(_logits(ztxt, all_gather_batch(zimg, axes), scale, bias), 1)
  local = jnp.sum(row - pos) + jnp.sum(col - pos)
  return 0.5 * _psum(local, axes) / (zimg.shape[0] * n)


# -------------------------------------------------------------------- ring --


def _bias_or_zero(bias: Array | None, like: Array) -> Array:
  return jnp.zeros((), like.dtype) if bias is None else bias


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sigmoid_ring_vjp(zimg, ztxt, scale, bias, axes: Axes, n: int) -> Array:
  return _sigmoid_ring_fwd(zimg, ztxt, scale, bias, axes, n)[0]


def _sigmoid_ring_fwd(zimg, ztxt, scale, bias, axes, n):
  labels_pos = 2.0 * jnp.eye(zimg.shape[0], dtype=zimg.dtype) - 1.0

  def block(txt, travel, acc, positives):
    logits = _logits(zimg, txt, scale, bias)  # [b, b]
    signed = labels_pos * logits if positives else -logits  # negatives only
    return travel, acc - jnp.sum(jax.nn.log_sigmoid(signed))

  _, acc = _ring(block, ztxt, (), jnp.zeros((), zimg.dtype), axes, n)
  loss = _psum(acc, axes) / (zimg.shape[0] * n)
  return loss, (zimg, ztxt, scale, bias)


def _sigmoid_ring_bwd(axes, n, res, g):
  zimg, ztxt, scale, bias = res
  b = zimg.shape[0]
  c = g / (b * n)
  labels_pos = 2.0 * jnp.eye(b, dtype=zimg.dtype) - 1.0

  def block(txt, dtxt, local, positives):
    dz, ds, db = local
    dot = zimg @ txt.T  # [b, b], recomputed
    logits = scale * dot + bias
    if positives:  # d/dx -log_sigmoid(l x) = -l sigmoid(-l x)
      dlogits = -labels_pos * jax.nn.sigmoid(-labels_pos * logits) * c
    else:
      dlogits = jax.nn.sigmoid(logits) * c
    dz = dz + scale * (dlogits @ txt)
    dtxt = dtxt + scale * (dlogits.T @ zimg)
    return dtxt, (dz, ds + jnp.sum(dlogits * dot), db + jnp.sum(dlogits))

  zero = jnp.zeros((), zimg.dtype)
  dtxt, (dz, ds, db) = _ring(block, ztxt, jnp.zeros_like(ztxt), (jnp.zeros_like(zimg), zero, zero), axes, n)
  return (
    _cotangent_like(dz, zimg),
    _cotangent_like(dtxt, ztxt),
    _cotangent_like(_psum(ds, axes), scale),
    _cotangent_like(_psum(db, axes), bias),
  )


_sigmoid_ring_vjp.defvjp(_sigmoid_ring_fwd, _sigmoid_ring_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _softmax_ring_vjp(zimg, ztxt, scale, bias, axes: Axes, n: int) -> Array:
  return _softmax_ring_fwd(zimg, ztxt, scale, bias, axes, n)[0]


def _softmax_ring_fwd(zimg, ztxt, scale, bias, axes, n):
  b = zimg.shape[0]

  def block(txt, col_lse, row_lse, positives):
    logits = _logits(zimg, txt, scale, bias)  # [b, b]
    col_lse = jnp.logaddexp(col_lse, jax.nn.logsumexp(logits, axis=0))
    row_lse = jnp.logaddexp(row_lse, jax.nn.logsumexp(logits, axis=1))
    return col_lse, row_lse

  neg_inf = jnp.full((b,), -jnp.inf, zimg.dtype)
  col_lse, row_lse = _ring(block, ztxt, neg_inf, neg_inf, axes, n)
  pos = scale * jnp.sum(zimg * ztxt, axis=-1) + bias
  local = jnp.sum(row_lse - pos) + jnp.sum(col_lse - pos)
  loss = 0.5 * _psum(local, axes) / (b * n)
  return loss, (zimg, ztxt, scale, bias, row_lse, col_lse)


def _softmax_ring_bwd(axes, n, res, g):
  zimg, ztxt, scale, bias, row_lse, col_lse = res
  b = zimg.shape[0]
  c = g / (b * n)
  eye = jnp.eye(b, dtype=zimg.dtype)

  def block(txt, travel, local, positives):
    col, dtxt = travel
    dz, ds, db = local
    dot = zimg @ txt.T  # [b, b], recomputed
    logits = scale * dot + bias
    p_row = jnp.exp(logits - row_lse[:, None])
    p_col = jnp.exp(logits - col[None, :])
    dlogits = 0.5 * c * (p_row + p_col)
    if positives:
      dlogits = dlogits - c * eye
    dz = dz + scale * (dlogits @ txt)
    dtxt = dtxt + scale * (dlogits.T @ zimg)
    return (col, dtxt), (dz, ds + jnp.sum(dlogits * dot), db + jnp.sum(dlogits))

  zero = jnp.zeros((), zimg.dtype)
  (_, dtxt), (dz, ds, db) = _ring(
    block, ztxt, (col_lse, jnp.zeros_like(ztxt)), (jnp.zeros_like(zimg), zero, zero), axes, n
  )
  return (
    _cotangent_like(dz, zimg),
    _cotangent_like(dtxt, ztxt),
    _cotangent_like(_psum(ds, axes), scale),
    _cotangent_like(_psum(db, axes), bias),
  )


_softmax_ring_vjp.defvjp(_softmax_ring_fwd, _softmax_ring_bwd)


def _sigmoid_ring(zimg, ztxt, scale, bias, axes: Axes, n: int) -> Array:
  """Inside shard_map: [b, D], [b, D] -> global loss []; O(b^2) extra memory."""
  return _sigmoid_ring_vjp(zimg, ztxt, scale, _bias_or_zero(bias, scale), axes, n)


def _softmax_ring(zimg, ztxt, scale, bias, axes: Axes, n: int) -> Array:
  """Inside shard_map: [b, D], [b, D] -> global loss []; O(b^2) extra memory."""
  return _softmax_ring_vjp(zimg, ztxt, scale, _bias_or_zero(bias, scale), axes, n)


# ---------------------------------------------------------------- registry --

LOSSES: dict[tuple[str, str], LossFn] = {
  ("sigmoid", "local"): lambda zi, zt, s, b, axes, n: sigmoid_loss(zi, zt, s, b),
  ("softmax", "local"): lambda zi, zt, s, b, axes, n: softmax_loss(zi, zt, s, b),
  ("sigmoid", "all_gather"): _sigmoid_all_gather,
  ("softmax", "all_gather"): _softmax_all_gather,
  ("sigmoid", "ring"): _sigmoid_ring,
  ("softmax", "ring"): _softmax_ring,
}


def _check_kind_impl(kind: str, impl: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"Unknown contrastive loss kind {kind!r}; valid: {KINDS}.")
  if impl not in IMPLS:
    raise ValueError(f"Unknown contrastive loss impl {impl!r}; valid: {IMPLS}.")


def get_loss_fn(kind: str, impl: str) -> LossFn:
  """Looks up ``LOSSES[(kind, impl)]``; ValueError names the valid choices."""
  _check_kind_impl(kind, impl)
  return LOSSES[(kind, impl)]


def contrastive_metrics(
  zimg: Array, ztxt: Array, scale: Array, bias: Array | None, axes: Sequence[str] = ()
) -> dict[str, Array]:
  """Mean positive and negative logit over the global batch, O(D) communication.

  Inside shard_map with ``axes`` (or on one device with ``axes=()``). Uses
  sum_ij logits_ij = scale * <sum_i zimg_i, sum_j ztxt_j> + B^2 bias.
  """
  axes = tuple(axes)
  zimg, ztxt, scale = jax.lax.stop_gradient((zimg, ztxt, scale))
  big_b = float(zimg.shape[0] * (jax.lax.axis_size(axes) if axes else 1))  # no int32 B^2
  pos_sum = _psum(scale * jnp.sum(zimg * ztxt), axes)
  all_sum = scale * jnp.dot(_psum(jnp.sum(zimg, 0), axes), _psum(jnp.sum(ztxt, 0), axes))
  pos = pos_sum / big_b
  neg = (all_sum - pos_sum) / max(big_b * big_b - big_b, 1.0)
  if bias is not None:
    bias = jax.lax.stop_gradient(bias)
    pos, neg = pos + bias, neg + bias
  return {"pos_logit": pos, "neg_logit": neg}


def contrastive_loss(
  zimg: Array,
  ztxt: Array,
  scale: Array | float,
  bias: Array | float | None = None,
  *,
  kind: str = "sigmoid",
  impl: str = "all_gather",
  mesh: Mesh | None = None,
  axes: Sequence[str] = ("data", "fsdp"),
) -> tuple[Array, dict[str, Array]]:
  """Contrastive loss of global embeddings zimg, ztxt [B, D] -> (loss [], metrics).

  With ``mesh``, the batch is sharded over the names of ``axes`` present in
  the mesh (others, e.g. 'tensor', hold replicas) and the loss runs in
  ``jax.shard_map``; ``impl='local'`` or ``mesh=None`` computes on one device.
  Jit-able; differentiable w.r.t. zimg, ztxt, scale and bias. Metrics:
  ``pos_logit`` / ``neg_logit``, the mean diagonal / off-diagonal logit.
  """
  fn = get_loss_fn(kind, impl)
  scale = jnp.asarray(scale, dtype=jnp.result_type(zimg.dtype, jnp.float32))
  if bias is not None:
    bias = jnp.asarray(bias, dtype=scale.dtype)
  if mesh is None or impl == "local":
    return fn(zimg, ztxt, scale, bias, (), 1), contrastive_metrics(zimg, ztxt, scale, bias)

  axes = tuple(a for a in axes if a in mesh.axis_names)
  n = math.prod(mesh.shape[a] for a in axes)
  if zimg.shape != ztxt.shape or zimg.shape[0] % n:
    raise ValueError(
      f"zimg {zimg.shape} and ztxt {ztxt.shape} must have equal shapes with batch divisible by {n} (mesh axes {axes})."
    )
  batch_spec = P(axes if axes else None, None)

  def per_device(zi, zt, s, b):
    return fn(zi, zt, s, b, axes, n), contrastive_metrics(zi, zt, s, b, axes)

  return jax.shard_map(per_device, mesh=mesh, in_specs=(batch_spec, batch_spec, P(), P()), out_specs=P())(
    zimg, ztxt, scale, bias
  )


# ------------------------------------------------- pairwise similarities --
#
# Models whose logit for a pair is not a dot product of two fixed embeddings
# (Llip: the image embedding depends on the caption) give a similarity
# function ``sim(img, txt) -> [bi, bt]`` over pytrees of per-example arrays
# ``img`` [bi, ...] and ``txt`` [bt, ...]; logits = scale * sim + bias.
# The same three implementations: ``'local'``, ``'all_gather'`` (each device
# gathers the text side, [b, B] blocks; softmax also gathers the image side
# for the columns) and ``'ring'`` (sigmoid only: the text side travels, only
# [b, b] blocks exist, and the backward pass recomputes each block's
# similarity and pulls its cotangent back with ``jax.vjp``).

SimFn = Callable[[Any, Any], Array]


def _batch_size(tree: Any) -> int:
  return jax.tree.leaves(tree)[0].shape[0]


def _gather_tree(tree: Any, axes: Axes) -> Any:
  return jax.tree.map(lambda x: all_gather_batch(x, axes), tree)


def _sum_metrics(logits: Array, labels: Array) -> Array:
  """[2]: sums of the positive and of the negative logits of a block (no gradient)."""
  logits = jax.lax.stop_gradient(logits)
  pos = labels > 0
  return jnp.stack([jnp.sum(jnp.where(pos, logits, 0.0)), jnp.sum(jnp.where(pos, 0.0, logits))])


def _pairwise_labels(b: int, big_b: int, offset: Array, dtype) -> Array:
  cols = jnp.arange(big_b)[None, :]
  rows = offset + jnp.arange(b)[:, None]
  return jnp.where(cols == rows, 1.0, -1.0).astype(dtype)


def _pairwise_sigmoid_gather(sim_fn, img, txt, scale, bias, axes: Axes, n: int):
  b = _batch_size(img)
  logits = scale * sim_fn(img, _gather_tree(txt, axes)) + bias  # [b, B]
  labels = _pairwise_labels(b, b * n, _axis_index(axes) * b, logits.dtype)
  loss = _psum(-jnp.sum(jax.nn.log_sigmoid(labels * logits)), axes) / (b * n)
  return loss, _psum(_sum_metrics(logits, labels), axes)


def _pairwise_softmax_gather(sim_fn, img, txt, scale, bias, axes: Axes, n: int):
  b = _batch_size(img)
  offset = _axis_index(axes) * b
  rows = scale * sim_fn(img, _gather_tree(txt, axes)) + bias  # [b, B]: local images
  cols = scale * sim_fn(_gather_tree(img, axes), txt) + bias  # [B, b]: local texts
  labels = _pairwise_labels(b, b * n, offset, rows.dtype)
  pos = jnp.sum(jnp.where(labels > 0, rows, 0.0), axis=1)
  local = jnp.sum(jax.nn.logsumexp(rows, axis=1) - pos) + jnp.sum(jax.nn.logsumexp(cols, axis=0) - pos)
  return 0.5 * _psum(local, axes) / (b * n), _psum(_sum_metrics(rows, labels), axes)


@partial(jax.custom_vjp, nondiff_argnums=(0, 5, 6))
def _pairwise_sigmoid_ring(sim_fn, img, txt, scale, bias, axes: Axes, n: int):
  return _pairwise_sigmoid_ring_fwd(sim_fn, img, txt, scale, bias, axes, n)[0]


def _pairwise_sigmoid_ring_fwd(sim_fn, img, txt, scale, bias, axes, n):
  b = _batch_size(img)
  labels_pos = 2.0 * jnp.eye(b, dtype=scale.dtype) - 1.0
  labels_neg = -jnp.ones((b, b), scale.dtype)

  def block(txt_block, travel, acc, positives):
    loss, sums = acc
    logits = scale * sim_fn(img, txt_block) + bias  # [b, b]
    labels = labels_pos if positives else labels_neg
    return travel, (loss - jnp.sum(jax.nn.log_sigmoid(labels * logits)), sums + _sum_metrics(logits, labels))

  zero = (jnp.zeros((), scale.dtype), jnp.zeros((2,), scale.dtype))
  _, (loss, sums) = _ring(block, txt, (), zero, axes, n)
  out = (_psum(loss, axes) / (b * n), _psum(sums, axes))
  return out, (img, txt, scale, bias)


def _pairwise_sigmoid_ring_bwd(sim_fn, axes, n, res, g):
  img, txt, scale, bias = res
  b = _batch_size(img)
  c = g[0] / (b * n)  # the metrics carry no gradient
  labels_pos = 2.0 * jnp.eye(b, dtype=scale.dtype) - 1.0

  def block(txt_block, dtxt, local, positives):
    dimg, ds, db = local
    sim, pullback = jax.vjp(sim_fn, img, txt_block)  # [b, b], recomputed
    logits = scale * sim + bias
    if positives:  # d/dx -log_sigmoid(l x) = -l sigmoid(-l x)
      dlogits = -labels_pos * jax.nn.sigmoid(-labels_pos * logits) * c
    else:
      dlogits = jax.nn.sigmoid(logits) * c
    di, dt = pullback(scale * dlogits)
    dimg = jax.tree.map(jnp.add, dimg, di)
    dtxt = jax.tree.map(jnp.add, dtxt, dt)
    return dtxt, (dimg, ds + jnp.sum(dlogits * sim), db + jnp.sum(dlogits))

  zero = jnp.zeros((), scale.dtype)
  zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
  dtxt, (dimg, ds, db) = _ring(block, txt, zeros(txt), (zeros(img), zero, zero), axes, n)
  return (dimg, dtxt, _cotangent_like(_psum(ds, axes), scale), _cotangent_like(_psum(db, axes), bias))


_pairwise_sigmoid_ring.defvjp(_pairwise_sigmoid_ring_fwd, _pairwise_sigmoid_ring_bwd)

PAIRWISE_LOSSES = {
  ("sigmoid", "all_gather"): _pairwise_sigmoid_gather,
  ("softmax", "all_gather"): _pairwise_softmax_gather,
  ("sigmoid", "ring"): _pairwise_sigmoid_ring,
}


def pairwise_contrastive_loss(
  img: Any,
  txt: Any,
  sim_fn: SimFn,
  scale: Array | float,
  bias: Array | float | None = None,
  *,
  kind: str = "sigmoid",
  impl: str = "all_gather",
  mesh: Mesh | None = None,
  axes: Sequence[str] = ("data", "fsdp"),
) -> tuple[Array, dict[str, Array]]:
  """Contrastive loss on logits ``scale * sim_fn(img, txt) + bias`` over the global batch.

  img, txt: pytrees of arrays with the global batch first, [B, ...]; sim_fn(img [bi], txt [bt])
  -> [bi, bt] must treat rows independently (it is called on blocks). Same kinds, impls, mesh
  handling and metrics as ``contrastive_loss``; ``('softmax', 'ring')`` is not implemented.
  """
  _check_kind_impl(kind, impl)
  leaf = jax.tree.leaves(img)[0]
  scale = jnp.asarray(scale, dtype=jnp.result_type(leaf.dtype, jnp.float32))
  bias = jnp.zeros((), scale.dtype) if bias is None else jnp.asarray(bias, dtype=scale.dtype)
  sharded = mesh is not None and impl != "local"
  if not sharded:
    axes, n, impl = (), 1, "all_gather"  # one device: gathering is the identity
  else:
    axes = tuple(a for a in axes if a in mesh.axis_names)
    n = math.prod(mesh.shape[a] for a in axes)
  if (kind, impl) not in PAIRWISE_LOSSES:
    raise ValueError(
      f"pairwise contrastive loss ({kind!r}, {impl!r}) is not implemented; "
      f"use one of {sorted(PAIRWISE_LOSSES)} or impl='local'."
    )
  batch = _batch_size(img)
  if _batch_size(txt) != batch or batch % n:
    raise ValueError(
      f"image side (batch {batch}) and text side (batch {_batch_size(txt)}) must "
      f"have equal batches divisible by {n} (mesh axes {axes})."
    )
  fn = PAIRWISE_LOSSES[(kind, impl)]

  def per_device(i, t, s, b):
    loss, sums = fn(sim_fn, i, t, s, b, axes, n)
    big_b = float(batch)
    return loss, {"pos_logit": sums[0] / big_b, "neg_logit": sums[1] / max(big_b * big_b - big_b, 1.0)}

  if not sharded:
    return per_device(img, txt, scale, bias)
  spec = lambda tree: jax.tree.map(lambda x: P(axes if axes else None), tree)
  return jax.shard_map(per_device, mesh=mesh, in_specs=(spec(img), spec(txt), P(), P()), out_specs=P())(
    img, txt, scale, bias
  )
