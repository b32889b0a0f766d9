"""Flamingo's building blocks (Alayrac et al. 2022): the Perceiver Resampler and GATED XATTN-DENSE.

PerceiverResampler (sec. 2.1, appendix A.1.1): R learned latents (64) read a variable number
of visual features [B, T, N, Dv] (T frames, learned time embeddings added) in `depth` (6) layers:

    x_f = flatten(x_f + time_embed[:T])                                        [B, T*N, Dv]
    every layer:  x = x + Attn(q=LN(x), kv=[LN(x_f); LN(x)])                   'attn'
                  x = x + FFW(LN(x))                                           'mlp'
    out = LN(x)                                                                [B, R, Dv]

Keys and values come from the concatenation [media; latents], not from the media alone (appendix
A.1.1: the latents also attend to themselves). Media and latents have their own LayerNorms
(lucidrains' flamingo-pytorch / HF IDEFICS); projections have no biases.

GatedCrossAttentionBlock (sec. 2.2, "GATED XATTN-DENSE"): inserted before a frozen LM block,

    y = x + tanh(alpha_attn) * CrossAttn(q=LN(x), kv=media)                    'attn'
    y = y + tanh(alpha_ffw)  * FFW(LN(y))                                      'mlp'

alphas initialised at 0, so at init the block is the identity and the LM's outputs are unchanged.
Each text token attends only to the media (the resampled latents) of the last `<image>` placeholder
at or before it (sec. 2.3, per-image attention masking); a token with no image before it
attends to nothing and its cross-attention output is 0 (HF IDEFICS does the same:
`cross_attention_gate`). `media_attention_mask` builds that mask from token ids.

Defaults follow the paper (Flamingo-3B, the appendix's architecture table: 16 heads, key/value size 128,
squared-ReLU feed-forward; our FFW hidden size defaults to 4x the width). HF IDEFICS
(transformers' perceiver.py / modeling_idefics.py) differs in details covered by fields, see
vlm.convert.idefics: resampler FFW ReLU; optional qk LayerNorms in the resampler; in the gated
block RMSNorms, a SwiGLU FFW, optional qk RMSNorms and per-channel ('vector') gates.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.nn.attention import MultiHeadAttention
from vlm.nn.mlp import Mlp, dense
from vlm.nn.norms import make_norm

Dtype = Any


# ----------------------------------------------------------------------------- media masks


def media_index(tokens: jax.Array, image_token_id: int, eod_token_id: int | None = None) -> jax.Array:
  """Index of the media each token attends to, [B, T] int32: image placeholders at or before t, minus 1.

  -1: no image yet. eod_token_id (HF IDEFICS's processor for packed documents): after an end-of-document
  token, tokens attend to nothing again until the next image (the EOD token itself keeps its image).
  """
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
  is_img = tokens == image_token_id
  idx = jnp.cumsum(is_img.astype(jnp.int32), axis=1) - 1
  if eod_token_id is not None:
    pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    last_img = jax.lax.cummax(jnp.where(is_img, pos, -1), axis=1)
    last_eod = jax.lax.cummax(jnp.where(tokens == eod_token_id, pos, -1), axis=1)
    eod_before = jnp.concatenate([jnp.full_like(last_eod[:, :1], -1), last_eod[:, :-1]], axis=1)  # at < t
    idx = jnp.where(last_img > eod_before, idx, -1)
  return idx


def media_mask_from_index(index: jax.Array, num_media: int, all_previous: bool = False) -> jax.Array:
  """[B, T] media indices (-1 = none) -> boolean [B, T, num_media].

  all_previous: attend to every image so far instead of only the last one (the alternative that
  sec. 2.3 reports as worse). Indices >= num_media (more placeholders than images) select nothing.
  """
  m = jnp.arange(num_media, dtype=jnp.int32)
  index = index[..., None]
  if all_previous:
    return (m <= index) & (index < num_media)
  return m == index


def media_attention_mask(
  tokens: jax.Array, image_token_id: int, num_media: int, *, eod_token_id: int | None = None, all_previous: bool = False
) -> jax.Array:
  """Boolean [B, T, num_media]: token t may attend to media m (default: m is the last image at or before t).

  tokens [B, T] int; the k-th `image_token_id` of a row marks where its k-th image occurs.
  """
  if num_media < 1:
    raise ValueError(f"num_media must be >= 1, got {num_media}")
  return media_mask_from_index(media_index(tokens, image_token_id, eod_token_id), num_media, all_previous)


def expand_media_mask(mask: jax.Array, tokens_per_media: int) -> jax.Array:
  """[B, T, M] per-media mask -> [B, 1, T, M * tokens_per_media] key mask over the flattened media tokens."""
  return jnp.repeat(mask, tokens_per_media, axis=-1)[:, None]


# ----------------------------------------------------------------------------- feed-forward


class SquaredReLUMlp(nn.Module):
  """fc1 -> relu(.)^2 -> fc2, [..., D] -> [..., D]: Flamingo's feed-forward (the appendix's architecture
  table; squared ReLU from So et al. 2021, "Primer").

  Parameter names and init as vlm.nn.mlp.Mlp's non-gated layout (fc1, fc2), which lacks this activation.
  """

  mlp_dim: int
  use_bias: bool = False
  dropout: float = 0.0
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    bias_init = nn.initializers.normal(stddev=1e-6)
    h = dense(
      self.mlp_dim, ("embed", "mlp"), use_bias=self.use_bias, dtype=self.dtype, name="fc1", bias_init=bias_init
    )(x)
    h = jnp.square(jax.nn.relu(h))
    h = nn.with_logical_constraint(h, ("act_batch", "act_len", "act_mlp")) if h.ndim == 3 else h
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    return dense(
      x.shape[-1], ("mlp", "embed"), use_bias=self.use_bias, dtype=self.dtype, name="fc2", bias_init=bias_init
    )(h)


def make_ffw(mlp_dim: int, act: str, use_bias: bool, dropout: float, dtype: Dtype, name: str) -> nn.Module:
  """A feed-forward block named `name`: vlm.nn.mlp.Mlp, or SquaredReLUMlp for act='squared_relu'."""
  if act == "squared_relu":
    return SquaredReLUMlp(mlp_dim, use_bias, dropout, dtype, name=name)
  return Mlp(mlp_dim, act=act, use_bias=use_bias, dropout=dropout, dtype=dtype, name=name)


# ----------------------------------------------------------------------------- resampler


class PerceiverLayer(nn.Module):
  """One resampler layer: latents [B, R, D] attend to [LN(media); LN(latents)], then a pre-LN FFW."""

  num_heads: int
  head_dim: int | None
  mlp_dim: int
  mlp_act: str
  qk_norm: str | None
  use_bias: bool
  norm_eps: float
  dropout: float = 0.0
  dtype: Dtype = None

  @nn.compact
  def __call__(
    self, x: jax.Array, media: jax.Array, media_mask: jax.Array | None, deterministic: bool = True
  ) -> jax.Array:
    """x [B, R, D] latents; media [B, S, D]; media_mask [B, S] bool (True = real) or None."""
    norm = lambda name: make_norm("layer", self.norm_eps, self.dtype, name=name)  # noqa: E731
    y = norm("norm_latents")(x)
    kv = jnp.concatenate([norm("norm_media")(media).astype(y.dtype), y], axis=1)  # [B, S + R, D]
    mask = None
    if media_mask is not None:
      keys = jnp.concatenate([media_mask.astype(bool), jnp.ones(x.shape[:2], bool)], axis=1)
      mask = keys[:, None, None, :]
    y = MultiHeadAttention(
      num_heads=self.num_heads,
      head_dim=self.head_dim,
      use_bias=self.use_bias,
      qk_norm=self.qk_norm,
      norm_eps=self.norm_eps,
      dtype=self.dtype,
      name="attn",
    )(y, kv, mask=mask)
    x = x + nn.Dropout(self.dropout)(y, deterministic)
    y = make_ffw(self.mlp_dim, self.mlp_act, self.use_bias, self.dropout, self.dtype, "mlp")(
      norm("norm_mlp")(x), deterministic
    )
    return x + nn.Dropout(self.dropout)(y, deterministic)


class PerceiverResampler(nn.Module):
  """Visual features [B, N, D] or frames [B, T, N, D] -> [B, num_latents, D] (module docstring).

  Attributes:
    num_latents: R learned latent queries (Flamingo: 64).
    depth: layers (Flamingo: 6; IDEFICS-9b/80b: 6).
    num_heads, head_dim: attention heads and their width (Flamingo-3B: 16 x 128; None = D // heads).
    mlp_dim: FFW hidden size (default 4 D); mlp_act: 'squared_relu' (Flamingo), 'relu' (IDEFICS),
      or any vlm.nn.mlp activation.
    max_frames: learned time embeddings [max_frames, D] added per frame (a 3-D input is one frame
      and gets time_embed[0]); None: no time embeddings (IDEFICS).
    qk_norm: None (Flamingo) or 'layer' (IDEFICS `qk_layer_norms_perceiver`): per-head LayerNorm of
      queries and keys.
    use_bias: biases on the attention and FFW projections (Flamingo / IDEFICS: none).
    norm_eps: every LayerNorm's epsilon (1e-5: PyTorch's default, as in the reference code).

  Params: latents [R, D], time_embed [max_frames, D], block_{i}/{norm_latents, norm_media, attn,
  norm_mlp, mlp}, norm.
  """

  num_latents: int = 64
  depth: int = 6
  num_heads: int = 16
  head_dim: int | None = 128
  mlp_dim: int | None = None
  mlp_act: str = "squared_relu"
  max_frames: int | None = None
  qk_norm: str | None = None
  use_bias: bool = False
  norm_eps: float = 1e-5
  dropout: float = 0.0
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, train: bool = False) -> jax.Array:
    """x [B, N, D] or [B, T, N, D]; mask [B, N] / [B, T, N] bool (True = real feature) -> [B, R, D]."""
    if self.num_latents < 1 or self.depth < 0:
      raise ValueError(f"num_latents must be >= 1 and depth >= 0, got {self.num_latents}, {self.depth}")
    if x.ndim == 3:
      x = x[:, None]
      mask = None if mask is None else mask[:, None]
    if x.ndim != 4:
      raise ValueError(f"PerceiverResampler input must be [B, N, D] or [B, T, N, D], got shape {x.shape}")
    b, t, n, d = x.shape
    if mask is not None and mask.shape != (b, t, n):
      raise ValueError(f"mask has shape {mask.shape}, the features {x.shape[:-1]}")
    x = jnp.asarray(x, self.dtype or jnp.float32)
    if self.max_frames is not None:
      if t > self.max_frames:
        raise ValueError(f"{t} frames exceed max_frames={self.max_frames} (the learned time embeddings)")
      time = self.param(
        "time_embed", nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")), (self.max_frames, d)
      )
      x = x + time[:t][None, :, None].astype(x.dtype)
    media = x.reshape(b, t * n, d)
    mask = None if mask is None else mask.reshape(b, t * n)
    latents = self.param(
      "latents", nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")), (self.num_latents, d)
    )
    h = jnp.broadcast_to(latents.astype(media.dtype), (b, self.num_latents, d))
    for i in range(self.depth):
      h = PerceiverLayer(
        num_heads=self.num_heads,
        head_dim=self.head_dim,
        mlp_dim=self.mlp_dim or 4 * d,
        mlp_act=self.mlp_act,
        qk_norm=self.qk_norm,
        use_bias=self.use_bias,
        norm_eps=self.norm_eps,
        dropout=self.dropout,
        dtype=self.dtype,
        name=f"block_{i}",
      )(h, media, mask, not train)
    h = make_norm("layer", self.norm_eps, self.dtype, name="norm")(h)
    return nn.with_logical_constraint(h, ("act_batch", "act_len", "act_embed"))


# ----------------------------------------------------------------------------- gated cross-attention

ALPHA_SHAPES = ("scalar", "vector")


class GatedCrossAttentionBlock(nn.Module):
  """GATED XATTN-DENSE: text x [B, T, D] x media [B, S, Dm] -> [B, T, D] (module docstring).

  Attributes:
    num_heads, head_dim: cross-attention heads (Flamingo-3B: 16 x 128; None = D // heads, as IDEFICS).
    mlp_dim: FFW hidden size (default 4 D); mlp_act: 'squared_relu' (Flamingo) or any vlm.nn.mlp
      activation ('swiglu' = IDEFICS's LlamaMLP-style gate/up/down with SiLU).
    norm: 'layer' (Flamingo) or 'rms' (IDEFICS) for the two pre-norms.
    qk_norm: None (Flamingo), or 'rms' (IDEFICS `qk_layer_norms`): per-head norm of queries and keys.
    use_bias: biases on the projections (none in either).
    alpha_shape: 'scalar' (Flamingo; IDEFICS alpha_type 'float') gates [1], or 'vector' (IDEFICS
      alpha_type 'vector') per-channel gates [D].
    alpha_init: initial gate pre-activation (0: tanh(0) = 0, the block starts as the identity).

  Params: norm_attn, attn (MultiHeadAttention), alpha_attn, norm_ffw, mlp, alpha_ffw.
  """

  num_heads: int = 16
  head_dim: int | None = 128
  mlp_dim: int | None = None
  mlp_act: str = "squared_relu"
  norm: str = "layer"
  norm_eps: float = 1e-5
  qk_norm: str | None = None
  use_bias: bool = False
  alpha_shape: str = "scalar"
  alpha_init: float = 0.0
  dropout: float = 0.0
  dtype: Dtype = None

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    media: jax.Array | None,
    media_mask: jax.Array | None = None,
    deterministic: bool = True,
    decode: bool = False,
  ) -> jax.Array:
    """x [B, T, D]; media [B, S, Dm] (None: no media: only the gated FFW runs, unless decoding reads
    the cached media keys/values); media_mask: boolean key mask broadcastable to [B, 1, T, S]
    (e.g. expand_media_mask(media_attention_mask(...))); a token whose row of the mask is all False
    gets 0 from the cross-attention. decode: the cache-creating call projects media to keys/values
    ('cross_key'/'cross_value' in the 'cache' collection), later calls reuse them (media may be None).
    """
    if self.alpha_shape not in ALPHA_SHAPES:
      raise ValueError(f"alpha_shape must be one of {ALPHA_SHAPES}, got {self.alpha_shape!r}")
    d = x.shape[-1]
    shape, axes = ((1,), (None,)) if self.alpha_shape == "scalar" else ((d,), ("norm",))
    init = nn.initializers.constant(self.alpha_init)
    alpha_attn = self.param("alpha_attn", nn.with_logical_partitioning(init, axes), shape)
    alpha_ffw = self.param("alpha_ffw", nn.with_logical_partitioning(init, axes), shape)
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
    norm_attn = make_norm(self.norm, self.norm_eps, self.dtype, name="norm_attn")
    attn = MultiHeadAttention(
      num_heads=self.num_heads,
      head_dim=self.head_dim,
      use_bias=self.use_bias,
      qk_norm=self.qk_norm,
      norm_eps=self.norm_eps,
      dtype=self.dtype,
      name="attn",
    )
    if media is not None or decode:
      if media is not None:
        media = jnp.asarray(media, x.dtype)
      mask = None if media_mask is None else media_mask.astype(bool)
      if mask is not None and mask.ndim == 3:
        mask = mask[:, None]
      y = attn(norm_attn(x), media, mask=mask, decode=decode, cross=True)
      if mask is not None:  # tokens that see no media get 0 (not the mean of masked values)
        y = jnp.where(jnp.any(mask, axis=(1, -1))[..., None], y, 0)
      x = x + jnp.tanh(alpha_attn).astype(y.dtype) * nn.Dropout(self.dropout)(y, deterministic)
    elif self.is_initializing():
      raise ValueError("GatedCrossAttentionBlock: initialise with media (its attention params need the media width)")
    y = make_ffw(self.mlp_dim or 4 * d, self.mlp_act, self.use_bias, self.dropout, self.dtype, "mlp")(
      make_norm(self.norm, self.norm_eps, self.dtype, name="norm_ffw")(x), deterministic
    )
    x = x + jnp.tanh(alpha_ffw).astype(y.dtype) * nn.Dropout(self.dropout)(y, deterministic)
    return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
