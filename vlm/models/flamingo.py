"""Flamingo (Alayrac et al. 2022): a frozen LM conditioned on images by gated cross-attention.

    images [B, M, H, W, 3] (or frames [B, M, F, H, W, 3]) -> ViT (final-layer tokens)
      -> PerceiverResampler per image (vlm.nn.perceiver)            media [B, M, R, Dv]
    tokens [B, T] -> DecoderLM blocks, with a GatedCrossAttentionBlock (`xattn_{j}`) inserted before
      LM block j * cross_attention_every (sec. 2.2: every block for Flamingo-3B, every 4th for 9B,
      every 7th for 80B)                                              -> logits [B, T, V] float32

The images are not spliced into the sequence (unlike LLaVA): `image_token_id` placeholders are
ordinary LM tokens marking where each image occurs; the k-th placeholder of a row stands for the
row's k-th image, and text token t cross-attends only to the R latents of the last image at or
before it (sec. 2.3, vlm.nn.perceiver.media_attention_mask; tokens before any image get no
cross-attention output). Rows with fewer placeholders than M leave the surplus images unused.
Packed rows (`segment_ids`) also stop a token from attending to an image of an earlier segment.

At init every gate is tanh(0) = 0, so the logits are exactly the LM's (sec. 2.2). The paper trains
only the resampler and the gated blocks: freeze `vision/.*` and `lm/.*` with config.frozen.

Params: vision/... (ViT), resampler/... (PerceiverResampler), xattn_{j}/... (GatedCrossAttentionBlock),
lm/... with exactly DecoderLM's paths (embedding, decoder/block_{i}, norm, head): a pretrained
DecoderLM checkpoint loads into `lm` unchanged (config.init mapping {'lm': ''}).

Decoding (vlm.decoding's step protocol): the call that creates the cache (init_cache) encodes the
images; each cross-attention caches its keys/values of the media ('cross_key'/'cross_value',
[B, M*R, heads, hd]), the LM blocks their self-attention keys/values, and the top level 'tokens'
[B, cache_len] (every fed token, for the media mask of later steps), 'valid' [B, cache_len] (the
prompt's padding mask) and 'media_valid' [B, M] (False when decoding without images). Later steps
pass tokens only::

    out = generate(model, params, images, prompt, max_new_tokens=..., eos_id=...)
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm import decoding
from vlm.models import generation
from vlm.models.decoder import DecoderLM, positions_from_mask, positions_from_segments, segment_attention_mask
from vlm.models.vit import ViT
from vlm.nn.perceiver import (
  GatedCrossAttentionBlock,
  PerceiverResampler,
  expand_media_mask,
  media_index,
  media_mask_from_index,
)
from vlm.nn.transformer import REMAT_POLICIES, block_class

Dtype = Any


class LMLayers(nn.Module):
  """DecoderLM's unrolled Stack with its blocks (`block_{i}`, same params) reachable one by one as
  `layers[i]`, so that gated cross-attention can run between them. Calling it runs them all, as Stack
  does (same arguments, no return_all)."""

  depth: int
  block: dict
  remat_policy: str = "none"

  def setup(self):
    block = block_class(self.remat_policy)
    self.layers = [block(**self.block, name=f"block_{i}") for i in range(self.depth)]

  def __call__(
    self,
    x: jax.Array,
    context: jax.Array | None = None,
    mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    deterministic: bool = True,
    decode: bool = False,
    index: jax.Array | int = 0,
    cache_len: int | None = None,
  ) -> jax.Array:
    for layer in self.layers:
      x = layer(x, context, mask, positions, deterministic, decode, index, cache_len)
    return x


class FlamingoLM(DecoderLM):
  """DecoderLM (same fields, params and methods) whose `decoder` is LMLayers: Flamingo interleaves its
  gated cross-attention blocks with `decoder.layers[i]`. On its own it is a plain DecoderLM, except that
  scan_layers=True is refused (ValueError): the blocks must stay reachable one by one."""

  stack_class = LMLayers


class Flamingo(nn.Module):
  """ViT -> PerceiverResampler -> DecoderLM with gated cross-attention (module docstring).

  Attributes:
    lm_config: DecoderLM kwargs (vlm.models.decoder).
    vision_config: ViT kwargs; pool_type is forced to 'none' and the final layer's tokens are used
      ('encoded': after the final norm unless final_norm=False).
    resampler_config: PerceiverResampler kwargs (default: the paper's, 64 latents, 6 layers).
    xattn_config: GatedCrossAttentionBlock kwargs (default: the paper's).
    cross_attention_every: a gated block before LM blocks 0, k, 2k, ... (ceil(depth / k) blocks).
    image_token_id: the placeholder marking each image's position in the text.
    eod_token_id: optional end-of-document id: after it, tokens attend to no image until the next
      one (HF IDEFICS's processor for packed documents).
    all_previous_media: attend to every earlier image instead of the last one (sec. 2.3 found it worse).
    keep_cls: keep the ViT's class-token feature among the resampler's inputs (IDEFICS does).
  """

  lm_config: dict
  vision_config: dict
  resampler_config: dict | None = None
  xattn_config: dict | None = None
  cross_attention_every: int = 1
  image_token_id: int = 1000
  eod_token_id: int | None = None
  all_previous_media: bool = False
  keep_cls: bool = False
  dtype: Dtype = None

  def setup(self):
    if self.cross_attention_every < 1:
      raise ValueError(f"cross_attention_every must be >= 1, got {self.cross_attention_every}")
    if self.lm_config.get("scan_layers", False):
      raise ValueError(
        "Flamingo: lm_config.scan_layers=True is not supported: the gated cross-attention blocks "
        "run between the LM blocks, which stay unrolled (lm/decoder/block_{i}); set "
        "lm_config.scan_layers=False"
      )
    self.vision = ViT(**dict(self.vision_config, pool_type="none"), dtype=self.dtype)
    self.resampler = PerceiverResampler(**dict(self.resampler_config or {}), dtype=self.dtype)
    self.lm = FlamingoLM(**self.lm_config, dtype=self.dtype)
    block = GatedCrossAttentionBlock
    if self.lm_config.get("remat_policy", "none") != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[self.lm_config["remat_policy"]], static_argnums=(4, 5))
    n = math.ceil(self.lm_config["depth"] / self.cross_attention_every)
    self.xattn = [block(**dict(self.xattn_config or {}), dtype=self.dtype, name=f"xattn_{j}") for j in range(n)]

  # ------------------------------------------------------------------------ media

  def encode_images(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images [B, H, W, 3], [B, M, H, W, 3] or frames [B, M, F, H, W, 3] -> media [B, M, R, Dv]."""
    if images.ndim == 4:
      images = images[:, None]
    if images.ndim == 5:
      images = images[:, :, None]
    if images.ndim != 6:
      raise ValueError(f"images must be [B, H, W, 3], [B, M, H, W, 3] or [B, M, F, H, W, 3], got {images.shape}")
    b, m, f = images.shape[:3]
    _, aux = self.vision(images.reshape(b * m * f, *images.shape[3:]), train=train)
    feats = aux["encoded"]
    if self.vision_config.get("class_token") and not self.keep_cls:
      feats = feats[:, 1:]
    feats = feats.reshape(b * m, f, *feats.shape[1:])  # [B*M, F, N, Dv]
    media = self.resampler(feats, train=train)
    return media.reshape(b, m, *media.shape[1:])

  def media_mask(self, tokens: jax.Array, num_media: int, segment_ids: jax.Array | None = None) -> jax.Array:
    """Boolean [B, T, num_media]: which image each token cross-attends to (see vlm.nn.perceiver)."""
    idx = media_index(tokens, self.image_token_id, self.eod_token_id)
    if segment_ids is not None:  # the image must be in the token's own packed sequence
      pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
      last = jax.lax.cummax(jnp.where(tokens == self.image_token_id, pos, -1), axis=1)
      seg_of_last = jnp.take_along_axis(segment_ids, jnp.maximum(last, 0), axis=1)
      idx = jnp.where((last >= 0) & (seg_of_last == segment_ids), idx, -1)
    return media_mask_from_index(idx, num_media, self.all_previous_media)

  # ------------------------------------------------------------------------ forward

  def _layers(
    self,
    x,
    media,
    media_mask,
    attn_mask,
    positions,
    train: bool,
    decode: bool = False,
    index: jax.Array | int = 0,
    cache_len: int | None = None,
  ) -> jax.Array:
    """Gated cross-attention before every cross_attention_every-th LM block; the LM's final norm."""
    for i, block in enumerate(self.lm.decoder.layers):
      if i % self.cross_attention_every == 0:
        x = self.xattn[i // self.cross_attention_every](x, media, media_mask, not train, decode)
      x = block(x, None, attn_mask, positions, not train, decode, index, cache_len)
    return self.lm.norm(x)

  def __call__(
    self,
    images: jax.Array | None,
    tokens: jax.Array,
    train: bool = False,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    return_stats: bool = False,
  ):
    """Logits [B, T, V] float32 of tokens [B, T] conditioned on images ([B, M, H, W, 3], see
    encode_images; None: text only, every cross-attention sees nothing).

    mask: padding [B, T] (True = real); segment_ids: packed rows [B, T] (see DecoderLM). With
    return_stats also {'image_token_mismatch': fraction of rows with placeholders whose count is not M}.
    """
    b, t = tokens.shape
    x = self.lm.embed(tokens)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    media = kv_mask = None
    stats: dict = {}
    if images is not None:
      latents = self.encode_images(images, train)  # [B, M, R, Dv]
      m, r = latents.shape[1:3]
      media = latents.reshape(b, m * r, latents.shape[-1])
      kv_mask = expand_media_mask(self.media_mask(tokens, m, segment_ids), r)
      found = jnp.sum(tokens == self.image_token_id, axis=1)
      stats["image_token_mismatch"] = jnp.mean(((found != m) & (found > 0)).astype(jnp.float32))
    attn_mask, positions = None, None
    if segment_ids is not None:
      positions = positions_from_segments(segment_ids, mask)
      attn_mask = segment_attention_mask(segment_ids, mask)
    elif mask is not None:
      mask = mask.astype(bool)
      positions = positions_from_mask(mask)
      attn_mask = mask[:, None, None, :] | jnp.eye(t, dtype=bool)[None, None]
    if positions is None:
      positions = jnp.arange(t)
    logits = self.lm.logits(self._layers(x, media, kv_mask, attn_mask, positions, train))
    return (logits, stats) if return_stats else logits

  # ------------------------------------------------------------------------ cached decoding

  def decode_step(
    self,
    tokens: jax.Array,
    index: jax.Array | int,
    cache_len: int | None = None,
    mask: jax.Array | None = None,
    images: jax.Array | None = None,
  ) -> jax.Array:
    """Cached decoding: tokens [B, T] at cache slots [index, index + T) -> logits [B, T, V].

    The call that creates the cache (mutable=['cache']) gives cache_len, the prompt's padding mask
    [B, T] and the images (None: no media; every cross-attention then sees nothing); the media's
    keys/values are cached in each gated block, so later calls pass tokens and index only.
    """
    b, t = tokens.shape
    index = jnp.asarray(index, jnp.int32)
    r = self.resampler.num_latents
    media = None
    if not self.has_variable("cache", "valid"):
      length = cache_len or t
      valid = jnp.ones((b, length), bool)
      if mask is not None:
        valid = jax.lax.dynamic_update_slice(valid, mask.astype(bool), (0, 0))
      seq = jnp.zeros((b, length), jnp.int32)
      if images is not None:
        latents = self.encode_images(images)
        media = latents.reshape(b, -1, latents.shape[-1])
        media_valid = jnp.ones((b, latents.shape[1]), bool)
      else:  # placeholder media that no token may see (the cache needs a fixed structure)
        media = jnp.zeros((b, r, self.vision.dims()["width"]), self.dtype or jnp.float32)
        media_valid = jnp.zeros((b, 1), bool)
    else:
      if images is not None:
        raise ValueError("Flamingo.decode_step: pass images only to the call that creates the cache")
      valid = self.get_variable("cache", "valid")
      seq = self.get_variable("cache", "tokens")
      media_valid = self.get_variable("cache", "media_valid")
    seq = jax.lax.dynamic_update_slice(seq, tokens.astype(jnp.int32), (jnp.zeros((), jnp.int32), index))
    self.put_variable("cache", "valid", valid)
    self.put_variable("cache", "tokens", seq)
    self.put_variable("cache", "media_valid", media_valid)
    slots = index + jnp.arange(t)
    positions = jnp.take(jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0), slots, axis=1)
    own = jnp.arange(valid.shape[1])[None, :] == slots[:, None]  # [T, cache_len]
    attn_mask = valid[:, None, None, :] | own[None, None]
    idx = jnp.take(media_index(seq, self.image_token_id, self.eod_token_id), slots, axis=1)  # [B, T]
    mm = media_mask_from_index(idx, media_valid.shape[1], self.all_previous_media) & media_valid[:, None, :]
    x = self.lm.embed(tokens)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    h = self._layers(
      x,
      media,
      expand_media_mask(mm, r),
      attn_mask,
      positions,
      False,
      decode=True,
      index=index,
      cache_len=valid.shape[1],
    )
    return self.lm.logits(h)


def predict_fns(model: Flamingo) -> dict[str, Any]:
  """generate(params, images, prompt, **kw): decodes after prompt [B, P] (left-padded rows: pass
  `mask`) about images [B, M, H, W, 3] or None (no media) with the KV cache (vlm.models.generation;
  kw as there). The media's keys/values are cached when the cache is made, so the steps feed tokens only."""

  def generate(params, images, prompt, **kw) -> decoding.DecodeOutput:
    return generation.generate(model, params, prompt, cache_inputs={"images": images}, **kw)

  return {"generate": generate}
