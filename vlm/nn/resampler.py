"""Qwen-VL's resampler (Bai et al. 2023, "Qwen-VL", sec. 2.1: the position-aware vision-language
adapter), also Monkey's shared per-view resampler (Li et al. 2024, sec. 3.1).

One cross-attention layer compresses N image features to a fixed number of learned queries:

    kv = LN_kv(kv_proj(x))                                     x [B, N, Dv] -> [B, N, D]
    out = CrossAttn(LN_q(queries) + pos(g x g),  keys = kv + pos(grid of x),  values = kv)
    out = proj(LN_post(out))                                   -> [B, Q, out_dim or D]

Q = g * g queries (256 in Qwen-VL: a 16 x 16 grid) carry fixed 2D sin-cos position embeddings;
the keys get the same embedding interpolated (bicubic) to the features' grid, so the queries keep
positional information about where on the image they look; the values carry none (as Qwen-VL's
code: `attn(q + pos_q, x + pos_k, x)`). `ln_post` and the projection are Qwen-VL's
VisionTransformer.ln_post / proj, kept here so the module's output is the LLM-ready sequence.
The sin-cos layout is vlm.nn.posemb.sincos2d's (big_vision); Qwen-VL uses MAE's, whose frequencies
differ by one step in the exponent's denominator (a fixed embedding either way).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.nn.attention import MultiHeadAttention
from vlm.nn.norms import make_norm
from vlm.nn.posemb import resample_posemb, sincos2d
from vlm.nn.mlp import dense

Dtype = Any


def _square(n: int, what: str) -> int:
  g = math.isqrt(n)
  if g * g != n:
    raise ValueError(f"{what} must be a square number (a g x g grid), got {n}")
  return g


class QwenVLResampler(nn.Module):
  """Learned queries [Q, D] cross-attending to image features [B, N, Dv] -> [B, Q, out_dim or D].

  Attributes:
    num_queries: Q, a square number (Qwen-VL: 256).
    num_heads: attention heads (Qwen-VL: width // 128).
    width: D, the attention width (None: the features' width Dv); Dv != D adds `kv_proj` (no bias).
    out_dim: the output projection's width (the LLM's; None: no projection).
  """

  num_queries: int = 256
  num_heads: int = 16
  width: int | None = None
  out_dim: int | None = None
  norm_eps: float = 1e-6
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x [B, N, Dv] (N = h * w: a square grid of features, no class token); mask [B, N] valid."""
    g = _square(self.num_queries, "QwenVLResampler.num_queries")
    h = _square(x.shape[1], f"QwenVLResampler: the number of image features ({x.shape[1]})")
    d = self.width or x.shape[-1]
    if x.shape[-1] != d:
      x = dense(d, ("embed", "mlp"), use_bias=False, dtype=self.dtype, name="kv_proj")(x)
    kv = make_norm("layer", self.norm_eps, self.dtype, name="ln_kv")(x)
    pos_q = sincos2d(g, g, d)
    pos_k = resample_posemb(pos_q, (h, h), method="cubic")
    query = self.param(
      "query",
      nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), (None, "embed")),
      (self.num_queries, d),
    )
    q = make_norm("layer", self.norm_eps, self.dtype, name="ln_q")(query)[None] + pos_q
    q = jnp.broadcast_to(q, (x.shape[0],) + q.shape[1:])
    attn_mask = None if mask is None else mask.astype(bool)[:, None, None, :]
    out = MultiHeadAttention(self.num_heads, use_bias=True, dtype=self.dtype, name="attn")(
      q, kv + pos_k.astype(kv.dtype), values=kv, mask=attn_mask
    )
    out = make_norm("layer", self.norm_eps, self.dtype, name="ln_post")(out)
    if self.out_dim is not None:
      out = dense(self.out_dim, ("embed", "mlp"), use_bias=False, dtype=self.dtype, name="proj")(out)
    return out
