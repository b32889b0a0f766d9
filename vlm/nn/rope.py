"""Rotary position embeddings (Su et al. 2021) in the half-rotation layout of HF Llama's `rotate_half`.

Channel i of the first half of each head pairs with channel i + hd/2 of the second half, rotated by
angle `pos * theta ** (-2i / hd)`. Angles are computed in float32; the rotated tensor keeps its dtype.

Partial rotary (GPT-NeoX / Persimmon's `partial_rotary_factor`): only the first r = int(hd * fraction)
channels of each head are rotated, in the same half-rotation layout with hd replaced by r (pairs i and
i + r/2, angle `pos * theta ** (-2i / r)`); channels r.. pass through unchanged, as in HF's
`query_rot, query_pass = q[..., :r], q[..., r:]`.
"""

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
  """Inverse frequencies [hd/2], float32: theta ** (-2i / hd), as HF's default rope."""
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def rotary_dims(head_dim: int, fraction: float = 1.0) -> int:
  """Rotated channels per head: int(head_dim * fraction), truncated as HF's rotary_ndims."""
  r = int(head_dim * fraction)
  if not 0 < r <= head_dim or r % 2:
    raise ValueError(f"rotary fraction {fraction} of head_dim {head_dim} gives {r} rotated channels; "
                     "need an even number in (0, head_dim]")
  return r


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, rotary_dim: int | None = None) -> jax.Array:
  """Rotates x [B, T, H, hd] by integer (or float) positions [B, T] or [T].

  rotary_dim: rotate only the first r channels of each head (partial rotary; default all hd).
  """
  hd = x.shape[-1]
  if rotary_dim is not None and rotary_dim != hd:
    if not 0 < rotary_dim < hd:
      raise ValueError(f"rotary_dim={rotary_dim} must be in (0, head_dim={hd}]")
    return jnp.concatenate([apply_rope(x[..., :rotary_dim], positions, theta), x[..., rotary_dim:]], axis=-1)
  positions = jnp.asarray(positions)
  if positions.ndim == 1:
    positions = positions[None]
  freqs = positions.astype(jnp.float32)[..., None] * rope_frequencies(x.shape[-1], theta)  # [B, T, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, hd]
  # HF casts cos/sin to the activation dtype before the products; do the same.
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  return x * cos + rotate_half(x) * sin
