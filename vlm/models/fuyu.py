"""Fuyu (Adept, "Fuyu-8B: A Multimodal Architecture for AI Agents", https://www.adept.ai/blog/fuyu-8b):
no image encoder; image patches are linearly projected straight into the first layer of the decoder.

    image [B, H, W, C] (H, W multiples of p) -> non-overlapping p x p patches, row-major
      -> each patch flattened in (row, column, channel) order -> one Linear p*p*C -> D (with bias)
      -> [B, (H / p) * (W / p), D] written at the LM's image placeholders

It is a vision model for vlm.models.vision_lm.VisionLanguageModel (`vision_model='fuyu_patches'`,
`vision_method='patch_features'`, `connector_type='none'`); the decoder is a Persimmon DecoderLM
(vlm.models.decoder: LayerNorm, qk LayerNorm, half rotary, squared-ReLU MLP).

Sequence layout (the blog: patches go in raster-scan order, a special image-newline token marks the
end of each patch row, so any resolution works; HF FuyuProcessor): the image comes first, as (H / p) rows
of [W / p placeholders (`|SPEAKER|`, FuyuConfig.image_token_id, 71011 in Fuyu-8B), then one
`|NEWLINE|` token (71019)], then the text (HF puts BOS after the image). `image_token_layout` builds
these ids. The k-th placeholder of a row receives the k-th patch (VisionLanguageModel's in-order
fill, as HF's masked_scatter); the newline tokens are ordinary word embeddings. The decoder sees
plain causal attention and positions 0..T-1 over the whole sequence, image included.

Pixels: HF's FuyuImageProcessor scales to [-1, 1] ((x / 255 - 0.5) / 0.5) and pads to its
1080 x 1920 canvas, cropping the padding to a multiple of p; this module takes the image as given.
"""

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from vlm.nn.mlp import dense

Dtype = Any


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """images [B, H, W, C] -> patches [B, (H / p) * (W / p), p * p * C]: row-major patches, each
  flattened (row in patch, column in patch, channel) as HF's FuyuImageProcessor.patchify_image."""
  b, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(
      f"Fuyu: the image size {h}x{w} is not a multiple of patch_size={p}; crop or pad the "
      f"input to a multiple of it (data.pp_train / pp_eval)"
    )
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def image_token_layout(
  height: int, width: int, patch_size: int, image_token_id: int, newline_token_id: int
) -> np.ndarray:
  """The ids [(H / p) * (W / p + 1)] that stand for one image in Fuyu's sequence: each patch row's
  W / p placeholders followed by one newline token."""
  if height % patch_size or width % patch_size:
    raise ValueError(f"Fuyu: the image size {height}x{width} is not a multiple of patch_size={patch_size}")
  rows, cols = height // patch_size, width // patch_size
  row = np.array([image_token_id] * cols + [newline_token_id], np.int32)
  return np.tile(row, rows)


class FuyuPatchEmbed(nn.Module):
  """Fuyu's `vision_embed_tokens`: images [B, H, W, C] -> patch embeddings [B, N, width].

  Attributes:
    patch_size: p (Fuyu-8B: 30).
    width: the decoder's width D.

  Params: vision_embed/kernel [p * p * C, D] (logical axes None, 'embed'), vision_embed/bias [D].
  """

  patch_size: int
  width: int
  dtype: Dtype = None

  @nn.compact
  def patch_features(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images [B, H, W, C] (H, W multiples of patch_size) -> [B, (H / p) * (W / p), D], row-major."""
    del train  # no dropout or norm statistics: one Linear
    x = patchify(images, self.patch_size)
    return dense(self.width, (None, "embed"), use_bias=True, dtype=self.dtype, name="vision_embed")(x)

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    return self.patch_features(images, train)
