"""Patch embedding: non-overlapping p x p patches linearly projected to D."""

from typing import Any

import flax.linen as nn
import jax


class PatchEmbed(nn.Module):
  """Images [B, H, W, C] -> patch tokens [B, H/p, W/p, D] (a stride-p convolution)."""

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
    return nn.Conv(
        self.width,
        kernel_size=(ph, pw),
        strides=(ph, pw),
        padding="VALID",
        use_bias=self.use_bias,
        dtype=self.dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name="conv",
    )(images)
