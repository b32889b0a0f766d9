"""Rotary position embeddings (Su et al. 2021) in the half-rotation layout of HF Llama's `rotate_half`.

Channel i of the first half of each head pairs with channel i + hd/2 of the second half, rotated by
angle `pos * theta ** (-2i / hd)`. Angles are computed in float32; the rotated tensor keeps its dtype.
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


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotates x [B, T, H, hd] by integer (or float) positions [B, T] or [T]."""
  positions = jnp.asarray(positions)
  if positions.ndim == 1:
    positions = positions[None]
  freqs = positions.astype(jnp.float32)[..., None] * rope_frequencies(x.shape[-1], theta)  # [B, T, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, hd]
  # HF casts cos/sin to the activation dtype before the products; do the same.
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  return x * cos + rotate_half(x) * sin
