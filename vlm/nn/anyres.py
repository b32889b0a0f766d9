"""LLaVA-NeXT AnyRes feature packing with static shapes (Liu et al. 2024; HF LlavaNextModel.pack_image_features).

Per image, the encoder + connector give features of 1 + max_tiles views (vlm.data.anyres.anyres_views:
global view first, then rows x cols tiles row-major, then zero padding views), each an h x w grid.
The language model sees

    global view tokens [h*w] ;  for each row y of the unpadded tile grid: its features, image_newline

where the tile grid is the tiles' features reassembled to [rows*h, cols*w] and "unpadded" cuts the
rows or columns that only saw padding (HF unpad_image; vlm.data.anyres.unpadded_shape). The length
varies per image (vlm.data.anyres.num_image_tokens), so the output here is [B, max_tokens, D] with
the valid tokens compacted to the front in that order and zeros after, plus the valid count: a
model's `_scatter` writes the first `count` tokens at the image's `<image>` placeholders.

Everything is one gather with indices computed from (rows, cols, image size) under jit; the
unpadding uses integer arithmetic equal to HF's float formula (int(round(h * gw / w, 7)) is
floor(h * gw / w) for image sides below 10^7).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _hw(patch_grid: int | tuple[int, int]) -> tuple[int, int]:
  if isinstance(patch_grid, int) and not isinstance(patch_grid, bool) and patch_grid > 0:
    return patch_grid, patch_grid
  if (
    isinstance(patch_grid, (tuple, list))
    and len(patch_grid) == 2
    and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in patch_grid)
  ):
    return int(patch_grid[0]), int(patch_grid[1])
  raise ValueError(f"patch_grid must be a positive int or (h, w) of positive ints, got {patch_grid!r}")


def anyres_token_indices(
  grid: jax.Array, image_hw: jax.Array, *, num_views: int, patch_grid: int | tuple[int, int], max_tokens: int
) -> tuple[jax.Array, jax.Array]:
  """Where each packed token comes from: (src [B, max_tokens] int32, count [B] int32).

  grid [B, 2] (rows, cols) and image_hw [B, 2] (original height, width), ints. src indexes the
  flattened views [num_views * h*w] (view v, position p at v*h*w + p) with num_views * h*w meaning
  the newline vector; slots at or after count hold 0.
  """
  ph, pw = _hw(patch_grid)
  n = ph * pw
  grid = jnp.asarray(grid, jnp.int32)
  image_hw = jnp.asarray(image_hw, jnp.int32)
  rows, cols = grid[:, 0], grid[:, 1]
  oh, ow = image_hw[:, 0], image_hw[:, 1]
  gh, gw = rows * ph, cols * pw  # the reassembled tile feature grid
  one = lambda x: jnp.maximum(x, 1)  # noqa: E731  (no division by zero for padding rows)
  # HF unpad_image: if the image is wider than the grid, cut rows top and bottom, else columns.
  wide = ow * gh > gw * oh
  pad_h = jnp.where(wide, (gh - (oh * gw) // one(ow)) // 2, 0)
  pad_w = jnp.where(wide, 0, (gw - (ow * gh) // one(oh)) // 2)
  uh, uw = gh - 2 * pad_h, gw - 2 * pad_w
  count = n + uh * (uw + 1)

  j = jnp.arange(max_tokens, dtype=jnp.int32)[None]  # [1, L]
  k = jnp.maximum(j - n, 0)  # position in the unpadded part
  r, c = k // one(uw + 1)[:, None], k % one(uw + 1)[:, None]
  y, x = pad_h[:, None] + r, pad_w[:, None] + c  # position in the [gh, gw] grid
  tile = (y // ph) * cols[:, None] + x // pw
  from_tile = (1 + tile) * n + (y % ph) * pw + x % pw
  src = jnp.where(j < n, j, jnp.where(c == uw[:, None], num_views * n, from_tile))
  src = jnp.where(j < count[:, None], jnp.clip(src, 0, num_views * n), 0)
  return src.astype(jnp.int32), count.astype(jnp.int32)


def pack_anyres_features(
  features: jax.Array,
  grid: jax.Array,
  image_hw: jax.Array,
  newline: jax.Array,
  *,
  patch_grid: int | tuple[int, int],
  max_tokens: int,
) -> tuple[jax.Array, jax.Array]:
  """features [B, 1 + max_tiles, h*w, D] -> (tokens [B, max_tokens, D], count [B] int32).

  grid [B, 2]: (rows, cols) of tiles; image_hw [B, 2]: the original image size; newline [D].
  tokens[b, :count[b]] equals HF pack_image_features for that image; the rest is zeros
  (valid mask: arange(max_tokens) < count[:, None]). max_tokens: vlm.data.anyres.max_image_tokens;
  count exceeds it (and tokens are cut) only if max_tokens is too small for an image.
  """
  ph, pw = _hw(patch_grid)
  if features.ndim != 4 or features.shape[2] != ph * pw:
    raise ValueError(
      f"features must be [B, views, h*w={ph * pw}, D] for patch_grid {(ph, pw)}, got shape {features.shape}"
    )
  b, v, n, d = features.shape
  if newline.shape != (d,):
    raise ValueError(f"newline must be [D={d}], got shape {newline.shape}")
  if grid.shape != (b, 2) or image_hw.shape != (b, 2):
    raise ValueError(f"grid and image_hw must be [B={b}, 2], got {grid.shape} and {image_hw.shape}")
  if not isinstance(max_tokens, int) or max_tokens < n:
    raise ValueError(f"max_tokens must be an int >= h*w = {n}, got {max_tokens!r}")
  src, count = anyres_token_indices(grid, image_hw, num_views=v, patch_grid=(ph, pw), max_tokens=max_tokens)
  source = jnp.concatenate(
    [features.reshape(b, v * n, d), jnp.broadcast_to(newline.astype(features.dtype), (b, 1, d))], axis=1
  )
  tokens = jnp.take_along_axis(source, src[..., None], axis=1)
  valid = jnp.arange(max_tokens)[None] < count[:, None]
  return jnp.where(valid[..., None], tokens, 0), count


def compact_tokens(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """values [B, N, D], mask [B, N] -> (values with the masked-in ones first, in order, zeros after; count [B]).

  Joins several images' packed tokens of one row ([B, M * max_tokens] with their valid masks) into the
  in-order run that `_scatter` writes at the row's placeholders.
  """
  b, n = mask.shape
  pos = jnp.where(mask, jnp.cumsum(mask, axis=1) - 1, n)  # n: out of range, dropped
  out = jnp.zeros_like(values).at[jnp.arange(b)[:, None], pos].set(values, mode="drop")
  return out, jnp.sum(mask, axis=1).astype(jnp.int32)


class AnyResPack(nn.Module):
  """pack_anyres_features with the learned `image_newline` [D] (param axes ('embed',)).

  Initialised normal(0, 1/sqrt(D)) as HF LlavaNextModel (embed_std = 1 / sqrt(text hidden size));
  D is the LM width (the features come after the connector). Returns (tokens [B, max_tokens, D], count [B]).
  """

  patch_grid: int | tuple[int, int]
  max_tokens: int
  dtype: Any = None

  @nn.compact
  def __call__(self, features: jax.Array, grid: jax.Array, image_hw: jax.Array) -> tuple[jax.Array, jax.Array]:
    d = features.shape[-1]
    newline = self.param(
      "image_newline", nn.with_logical_partitioning(nn.initializers.normal(stddev=d**-0.5), ("embed",)), (d,)
    )
    if self.dtype is not None:
      features = features.astype(self.dtype)
    tokens, count = pack_anyres_features(
      features, grid, image_hw, newline, patch_grid=self.patch_grid, max_tokens=self.max_tokens
    )
    return nn.with_logical_constraint(tokens, ("act_batch", "act_len", "act_embed")), count
