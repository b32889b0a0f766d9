"""Pooling heads: cls / first, last, eos, global average, and MAP (learned-probe attention pooling); token
merging (MiniGPT4-Video's concatenation of adjacent tokens)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.nn.attention import MultiHeadAttention
from vlm.nn.mlp import Mlp
from vlm.nn.norms import make_norm


class MAPHead(nn.Module):
  """Multihead attention pooling (Lee et al. 2019; big_vision's MAPHead).

  [B, T, D] -> [B, D] (num_queries == 1) or [B, num_queries, D]: learned probes attend to the
  tokens, then x + MLP(LN(x)).
  """

  num_heads: int
  mlp_dim: int | None = None
  num_queries: int = 1
  mlp_act: str = "gelu"
  norm: str = "layer"
  norm_eps: float = 1e-6
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    b, _, d = x.shape
    probe = self.param(
      "probe",
      nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, None, "embed")),
      (1, self.num_queries, d),
    )
    probe = jnp.tile(probe, (b, 1, 1)).astype(x.dtype)
    attn_mask = None if mask is None else mask[:, None, None, :]
    x = MultiHeadAttention(num_heads=self.num_heads, dtype=self.dtype, name="attn")(probe, x, mask=attn_mask)
    y = make_norm(self.norm, self.norm_eps, self.dtype, name="norm")(x)
    x = x + Mlp(self.mlp_dim or 4 * d, act=self.mlp_act, dtype=self.dtype, name="mlp")(y)
    return x[:, 0] if self.num_queries == 1 else x


class AttentionalPooler(nn.Module):
  """CoCa's attentional pooler (Yu et al. 2022, sec. 3.2; open_clip's AttentionalPooler).

  `num_queries` learned queries cross-attend to the encoder tokens: [B, T, Dc] -> [B, num_queries, D].
  Queries and keys are layer-normed (ln_q, ln_k); no MLP and no residual, unlike MAPHead. CoCa uses
  two: 256 queries for the captioner's cross-attention, 1 for the contrastive embedding.
  width: query/output width D (default: the tokens' width Dc).
  """

  num_queries: int
  num_heads: int
  width: int | None = None
  norm_eps: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x [B, T, Dc]; mask [B, T] bool (True = a real token) -> [B, num_queries, D]."""
    d = self.width or x.shape[-1]
    query = self.param(
      "query", nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")), (self.num_queries, d)
    )
    q = make_norm("layer", self.norm_eps, self.dtype, name="ln_q")(query)
    x = make_norm("layer", self.norm_eps, self.dtype, name="ln_k")(x)
    q = jnp.broadcast_to(q.astype(x.dtype), (x.shape[0], self.num_queries, d))
    attn_mask = None if mask is None else mask[:, None, None, :]
    return MultiHeadAttention(num_heads=self.num_heads, dtype=self.dtype, name="attn")(q, x, mask=attn_mask)


POOL_TYPES = ("first", "cls", "last", "eos", "argmax", "gap", "map", "none")


def pool(
  x: jax.Array,
  pool_type: str,
  *,
  tokens: jax.Array | None = None,
  eos_id: int | None = None,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Non-parametric pooling of [B, T, D] -> [B, D] ('map' is the MAPHead module).

  first/cls: token 0. last: token T-1. eos: first position where tokens == eos_id.
  argmax: position of the largest token id (OpenAI CLIP's EOS pooling). gap: mean over valid tokens.
  """
  if pool_type in ("first", "cls"):
    return x[:, 0]
  if pool_type == "last":
    return x[:, -1]
  if pool_type in ("eos", "argmax"):
    if tokens is None:
      raise ValueError(f"pool_type={pool_type!r} needs the token ids")
    if pool_type == "eos":
      if eos_id is None:
        raise ValueError("pool_type='eos' needs eos_id")
      idx = jnp.argmax(tokens == eos_id, axis=-1)
    else:
      idx = jnp.argmax(tokens, axis=-1)
    return jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
  if pool_type == "gap":
    if mask is None:
      return jnp.mean(x, axis=1)
    m = mask[..., None].astype(x.dtype)
    return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  raise ValueError(f"unknown pool_type {pool_type!r}; known: {POOL_TYPES}")


def concat_adjacent_tokens(x: jax.Array, k: int) -> jax.Array:
  """Every k adjacent tokens concatenated into one: [B, N, D] -> [B, N // k, k * D] (token j of the
  output is tokens jk .. jk + k - 1, in order, along the features). MiniGPT4-Video (Ataallah et al.
  2024, sec. 3.1) merges each frame's visual tokens 4 at a time (256 -> 64) before the projection into
  the LM: 4x fewer tokens, none of their features dropped. N must be divisible by k."""
  b, n, d = x.shape
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"concat_adjacent_tokens: k must be a positive int, got {k!r}")
  if n % k:
    raise ValueError(f"concat_adjacent_tokens: {n} tokens are not divisible into groups of {k}")
  return x.reshape(b, n // k, k * d)
