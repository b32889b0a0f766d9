"""Position embeddings: learned, 2D sin-cos, and resampling a grid to a new resolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def sincos2d(h: int, w: int, dim: int, temperature: float = 10_000.0) -> jax.Array:
  """Fixed 2D sin-cos embedding [1, h*w, dim] (MoCo v3 / big_vision layout: [sin x, cos x, sin y, cos y])."""
  if dim % 4:
    raise ValueError(f"sincos2d needs dim divisible by 4, got {dim}")
  y, x = np.mgrid[:h, :w]
  omega = np.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1)
  omega = 1.0 / (temperature**omega)
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe, jnp.float32)[None]


def resample_posemb(posemb: jax.Array, new_grid: tuple[int, int], method: str = "bilinear") -> jax.Array:
  """Resamples a square-grid embedding [1, g*g, D] (or [g*g, D]) to [1, h*w, D] by image interpolation."""
  squeeze = posemb.ndim == 2
  pe = posemb[None] if squeeze else posemb
  n, d = pe.shape[1], pe.shape[2]
  g = int(round(np.sqrt(n)))
  if g * g != n:
    raise ValueError(f"position embedding of length {n} is not a square grid")
  h, w = new_grid
  if (g, g) == (h, w):
    return posemb
  grid = pe.reshape(1, g, g, d)
  grid = jax.image.resize(grid, (1, h, w, d), method=method, antialias=False)
  out = grid.reshape(1, h * w, d)
  return out[0] if squeeze else out


class LearnedPosEmb(nn.Module):
  """Learned additive position embedding: x [B, T, D] + pos_embedding[:, :T] ([1, length, D])."""

  length: int
  stddev: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pe = self.param(
      "pos_embedding",
      nn.with_logical_partitioning(nn.initializers.normal(self.stddev), (None, "pos", "embed")),
      (1, self.length, x.shape[-1]),
    )
    if x.shape[1] > self.length:
      raise ValueError(f"sequence length {x.shape[1]} exceeds the position embedding length {self.length}")
    return x + pe[:, : x.shape[1]].astype(x.dtype)
