"""Patch embedding: non-overlapping p x p patches linearly projected to D."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class PatchProjection(nn.Module):
  """The stride-p, p x p convolution of a patch embedding as one matmul over the patches.

  Parameters are a convolution's (kernel [ph, pw, C, D], bias [D]), so checkpoints of nn.Conv
  load unchanged; the result is the VALID convolution's. As a reshape + dot_general it avoids XLA's
  strided-convolution kernels (on CPU their backward cost more than the whole patch matmul).
  """

  width: int
  patch_size: tuple[int, int]
  use_bias: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    b, h, w, c = images.shape
    ph, pw = self.patch_size
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(nn.initializers.lecun_normal(in_axis=(0, 1, 2)), (None, None, None, "embed")),
      (ph, pw, c, self.width),
    )
    dtype = self.dtype or jnp.result_type(images.dtype, jnp.float32)
    x = jnp.asarray(images, dtype).reshape(b, h // ph, ph, w // pw, pw, c)
    y = jnp.einsum("bipjqc,pqcd->bijd", x, jnp.asarray(kernel, dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (self.width,))
      y = y + jnp.asarray(bias, dtype)
    return y


class PatchEmbed(nn.Module):
  """Images [B, H, W, C] -> patch tokens [B, H/p, W/p, D] (a stride-p convolution, params `conv/`)."""

  width: int
  patch_size: tuple[int, int]
  use_bias: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    h, w = images.shape[1:3]
    ph, pw = self.patch_size
    if h % ph or w % pw:
      raise ValueError(f"image size {(h, w)} is not divisible by patch size {self.patch_size}")
    return PatchProjection(self.width, (ph, pw), self.use_bias, self.dtype, name="conv")(images)
