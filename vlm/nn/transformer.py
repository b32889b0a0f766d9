"""Pre-norm transformer encoder: blocks, layer scan, remat policies, dropout and drop-path."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.nn.attention import MultiHeadAttention
from vlm.nn.mlp import Mlp
from vlm.nn.norms import make_norm

Dtype = Any

REMAT_POLICIES = {
  "none": None,  # no rematerialisation
  "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward pass
  "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
  "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DropPath(nn.Module):
  """Stochastic depth (Huang et al. 2016): drops the whole residual branch per example."""

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class EncoderBlock(nn.Module):
  """x + Attn(LN(x)); x + MLP(LN(x)). x: [B, T, D]."""

  num_heads: int
  mlp_dim: int
  mlp_act: str = "gelu"
  num_kv_heads: int | None = None
  qk_norm: str | None = None
  norm: str = "layer"
  norm_eps: float = 1e-6
  dropout: float = 0.0
  droppath: float = 0.0
  causal: bool = False
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True):
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
    y = make_norm(self.norm, self.norm_eps, self.dtype, name="norm1")(x)
    y = MultiHeadAttention(
      num_heads=self.num_heads,
      num_kv_heads=self.num_kv_heads,
      qk_norm=self.qk_norm,
      norm_eps=self.norm_eps,
      dtype=self.dtype,
      name="attn",
    )(y, mask=mask, causal=self.causal)
    y = nn.Dropout(self.dropout)(y, deterministic)
    x = x + DropPath(self.droppath)(y, deterministic)
    y = make_norm(self.norm, self.norm_eps, self.dtype, name="norm2")(x)
    y = Mlp(self.mlp_dim, act=self.mlp_act, dropout=self.dropout, dtype=self.dtype, name="mlp")(y, deterministic)
    y = nn.Dropout(self.dropout)(y, deterministic)
    x = x + DropPath(self.droppath)(y, deterministic)
    return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))


class Encoder(nn.Module):
  """A stack of `depth` EncoderBlocks, [B, T, D] -> [B, T, D].

  scan=True stacks the layers' parameters on a leading 'layers' axis (params
  `layers/...` of shape [depth, ...]) and compiles one block; otherwise `block_{i}/...`.
  remat_policy names a jax.checkpoint policy from REMAT_POLICIES.
  Returns the final activations and, if `return_all`, every block's output [depth, B, T, D].
  """

  depth: int
  num_heads: int
  mlp_dim: int
  mlp_act: str = "gelu"
  num_kv_heads: int | None = None
  qk_norm: str | None = None
  norm: str = "layer"
  norm_eps: float = 1e-6
  dropout: float = 0.0
  droppath: float = 0.0
  causal: bool = False
  scan: bool = False
  remat_policy: str = "none"
  dtype: Dtype = None

  def _block_kwargs(self) -> dict:
    return dict(
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      mlp_act=self.mlp_act,
      num_kv_heads=self.num_kv_heads,
      qk_norm=self.qk_norm,
      norm=self.norm,
      norm_eps=self.norm_eps,
      dropout=self.dropout,
      droppath=self.droppath,
      causal=self.causal,
      dtype=self.dtype,
    )

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True, return_all: bool = False):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; known: {sorted(REMAT_POLICIES)}")
    block = EncoderBlock
    if self.remat_policy != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy], static_argnums=(3,))
    if self.scan:

      def body(mdl, carry, _):
        out = mdl(carry, mask, deterministic)
        return out, (out if return_all else None)

      scanned = nn.scan(
        body,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        length=self.depth,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, hidden = scanned(block(**self._block_kwargs(), name="layers"), x, None)
      return (x, hidden) if return_all else x
    hidden = []
    for i in range(self.depth):
      x = block(**self._block_kwargs(), name=f"block_{i}")(x, mask, deterministic)
      hidden.append(x)
    return (x, jnp.stack(hidden)) if return_all else x


class DecoderBlock(nn.Module):
  """Pre-norm decoder block, [B, T, D] -> [B, T, D]:

    x + CausalSelfAttn(LN x);  x + CrossAttn(LN x, context) if cross_attention;  x + MLP(LN x).

  With decode=True the attentions use the KV cache of MultiHeadAttention (slot `index`; cross
  keys/values are projected once, so later calls may pass context=None).
  """

  num_heads: int
  mlp_dim: int
  cross_attention: bool = False
  mlp_act: str = "gelu"
  num_kv_heads: int | None = None
  qk_norm: str | None = None
  norm: str = "layer"
  norm_eps: float = 1e-6
  dropout: float = 0.0
  droppath: float = 0.0
  dtype: Dtype = None

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    context: jax.Array | None = None,
    mask: jax.Array | None = None,
    deterministic: bool = True,
    decode: bool = False,
    index: jax.Array | int = 0,
    cache_len: int | None = None,
  ):
    """mask: extra self-attention mask (e.g. key padding), combined with the causal mask."""
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))

    def residual(y):
      y = nn.Dropout(self.dropout)(y, deterministic)
      return x + DropPath(self.droppath)(y, deterministic)

    attn_kw = dict(
      num_heads=self.num_heads,
      num_kv_heads=self.num_kv_heads,
      qk_norm=self.qk_norm,
      norm_eps=self.norm_eps,
      dtype=self.dtype,
    )
    y = make_norm(self.norm, self.norm_eps, self.dtype, name="norm1")(x)
    y = MultiHeadAttention(**attn_kw, name="attn")(
      y, mask=mask, causal=True, decode=decode, index=index, cache_len=cache_len
    )
    x = residual(y)
    if self.cross_attention:
      if context is None and not decode:
        raise ValueError("DecoderBlock(cross_attention=True) needs a context")
      y = make_norm(self.norm, self.norm_eps, self.dtype, name="norm_cross")(x)
      y = MultiHeadAttention(**attn_kw, name="cross_attn")(y, context, decode=decode, cross=True)
      x = residual(y)
    y = make_norm(self.norm, self.norm_eps, self.dtype, name="norm2")(x)
    y = Mlp(self.mlp_dim, act=self.mlp_act, dropout=self.dropout, dtype=self.dtype, name="mlp")(y, deterministic)
    x = residual(y)
    return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))


class Decoder(nn.Module):
  """A stack of `depth` DecoderBlocks (`block_{i}/...`), [B, T, D] -> [B, T, D].

  remat_policy names a jax.checkpoint policy from REMAT_POLICIES (training only; decoding
  never rematerialises).
  """

  depth: int
  num_heads: int
  mlp_dim: int
  cross_attention: bool = False
  mlp_act: str = "gelu"
  num_kv_heads: int | None = None
  qk_norm: str | None = None
  norm: str = "layer"
  norm_eps: float = 1e-6
  dropout: float = 0.0
  droppath: float = 0.0
  remat_policy: str = "none"
  dtype: Dtype = None

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    context: jax.Array | None = None,
    mask: jax.Array | None = None,
    deterministic: bool = True,
    decode: bool = False,
    index: jax.Array | int = 0,
    cache_len: int | None = None,
  ):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; known: {sorted(REMAT_POLICIES)}")
    block = DecoderBlock
    if self.remat_policy != "none" and not decode:
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy], static_argnums=(4, 5, 7))
    for i in range(self.depth):
      x = block(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        cross_attention=self.cross_attention,
        mlp_act=self.mlp_act,
        num_kv_heads=self.num_kv_heads,
        qk_norm=self.qk_norm,
        norm=self.norm,
        norm_eps=self.norm_eps,
        dropout=self.dropout,
        droppath=self.droppath,
        dtype=self.dtype,
        name=f"block_{i}",
      )(x, context, mask, deterministic, decode, index, cache_len)
    return x
