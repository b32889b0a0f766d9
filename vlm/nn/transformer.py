"""The one pre-norm transformer block and layer stack (scan, remat) of every encoder, decoder and LM.

    Block:  x + Attn(norm1 x) [; x + CrossAttn(norm_cross x, context)] ; x + Mlp(norm2 x)      x: [B, T, D]
    Stack:  `depth` Blocks, unrolled (`block_{i}/...`) or under nn.scan (`layers/...`, stacked [depth, ...])

Family variants are named presets, not flags of the shared modules (as flax's
`ResNet50 = partial(ResNet, ...)`): `encoder_block` / `decoder_block` / `lm_block` return the Block
kwargs of a bidirectional (ViT / BERT) encoder, a causal decoder with optional cross-attention (CoCa)
and a rotary decoder-only LM (Llama family, vlm.models.decoder); `Encoder` and `Decoder` are the Stacks
of the first two.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.nn.attention import MultiHeadAttention
from vlm.nn.mlp import Mlp
from vlm.nn.norms import make_norm
from vlm.nn.rope import make_rope

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


class Block(nn.Module):
  """Pre-norm transformer block, [B, T, D] -> [B, T, D]:

    x + Attn(norm1 x);  x + CrossAttn(norm_cross x, context) if cross_attention;  x + Mlp(norm2 x)

  or, with swin_norm (Chameleon), the norms on the branch outputs: x + norm1(Attn x); x + norm2(Mlp x)
  (same parameters). Every branch goes through Dropout then DropPath before the residual add.

  Attributes:
    num_heads, num_kv_heads (GQA), head_dim (default D // heads), mlp_dim, mlp_act: see
      MultiHeadAttention and Mlp.
    qkv_bias / out_bias / mlp_bias: biases of the q/k/v, output (None: qkv_bias) and MLP projections.
    rope_theta / rope_scaling / rotary_fraction: rotary embeddings of self-attention (vlm.nn.rope;
      rope_theta None: none).
    qk_norm: per-head query/key norm (MultiHeadAttention). norm: 'layer' | 'rms', with norm_eps.
    causal: causal self-attention. cross_attention: a cross-attention branch over `context`.
    dropout / droppath: rates of the branch outputs (and the MLP's hidden dropout) / stochastic depth.

  Params: norm1, attn, [norm_cross, cross_attn,] norm2, mlp. The defaults are the encoder's; the family
  presets (encoder_block, decoder_block, lm_block) give the others.
  """

  num_heads: int
  mlp_dim: int
  mlp_act: str = "gelu"
  num_kv_heads: int | None = None
  head_dim: int | None = None
  qkv_bias: bool = True
  out_bias: bool | None = None
  mlp_bias: bool = True
  rope_theta: float | None = None
  rope_scaling: dict | None = None
  rotary_fraction: float = 1.0
  qk_norm: str | None = None
  norm: str = "layer"
  norm_eps: float = 1e-6
  swin_norm: bool = False
  dropout: float = 0.0
  droppath: float = 0.0
  causal: bool = False
  cross_attention: bool = False
  dtype: Dtype = None

  @nn.compact
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
    """x [B, T, D]; context [B, S, Dc] (cross_attention; with decode only the call creating the cache);
    mask: extra self-attention mask broadcastable to [B, N, T, T or cache_len] (combined with the causal
    one); positions: rotary positions [B, T]; decode / index / cache_len: MultiHeadAttention's KV cache
    (slot `index` of x's first token)."""
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))

    def residual(h: jax.Array, y: jax.Array) -> jax.Array:
      y = nn.Dropout(self.dropout)(y, deterministic)
      return h + DropPath(self.droppath)(y, deterministic)

    def branch(norm: nn.Module, fn, h: jax.Array) -> jax.Array:
      return residual(h, norm(fn(h)) if self.swin_norm else fn(norm(h)))

    attn_kw = dict(
      num_heads=self.num_heads,
      num_kv_heads=self.num_kv_heads,
      head_dim=self.head_dim,
      use_bias=self.qkv_bias,
      out_bias=self.out_bias,
      qk_norm=self.qk_norm,
      norm_eps=self.norm_eps,
      rope_theta=make_rope(self.rope_theta, self.rope_scaling),
      rotary_fraction=self.rotary_fraction,
      dtype=self.dtype,
    )
    attn = MultiHeadAttention(**attn_kw, name="attn")
    x = branch(
      make_norm(self.norm, self.norm_eps, self.dtype, name="norm1"),
      lambda h: attn(
        h, mask=mask, causal=self.causal, decode=decode, index=index, cache_len=cache_len, positions=positions
      ),
      x,
    )
    if self.cross_attention:
      if context is None and not decode:
        raise ValueError("Block(cross_attention=True) needs a context")
      cross = MultiHeadAttention(**attn_kw, name="cross_attn")
      norm = make_norm(self.norm, self.norm_eps, self.dtype, name="norm_cross")
      x = branch(norm, lambda h: cross(h, context, decode=decode, cross=True), x)
    mlp = Mlp(
      self.mlp_dim, act=self.mlp_act, use_bias=self.mlp_bias, dropout=self.dropout, dtype=self.dtype, name="mlp"
    )
    x = branch(make_norm(self.norm, self.norm_eps, self.dtype, name="norm2"), lambda h: mlp(h, deterministic), x)
    return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))


# Block.__call__'s static arguments for nn.remat (0 is the module): deterministic, decode, cache_len.
_STATIC_ARGNUMS = (5, 6, 8)


def block_class(remat_policy: str = "none", scan: bool = False) -> type[nn.Module]:
  """Block, or Block under nn.remat with the REMAT_POLICIES policy `remat_policy` (ValueError for an
  unknown name). Inside a scan the loop already keeps XLA from merging the recomputation away (flax's
  advice), so prevent_cse is off there."""
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {remat_policy!r}; known: {sorted(REMAT_POLICIES)}")
  if remat_policy == "none":
    return Block
  return nn.remat(Block, policy=REMAT_POLICIES[remat_policy], static_argnums=_STATIC_ARGNUMS, prevent_cse=not scan)


class Stack(nn.Module):
  """`depth` Blocks of kwargs `block` (a preset's), [B, T, D] -> [B, T, D].

  scan=False: the blocks are unrolled, params `block_{i}/...`. scan=True: one Block under nn.scan
  (compiled once), params `layers/...` stacked on a leading axis of size depth (logical axis 'layers');
  dropout rngs are split per layer and KV-cache leaves are stacked on axis 1, [B, depth, cache_len, K, hd],
  so that the cache stays batch-major (vlm.decoding gathers and repeats cache rows on axis 0).
  remat_policy names a REMAT_POLICIES policy, applied per block (inside the scan), in training only:
  decoding never rematerialises.
  """

  depth: int
  block: dict
  scan: bool = False
  remat_policy: str = "none"

  @nn.compact
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
    return_all: bool = False,
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Arguments as Block's (context, mask and positions are shared by every block). Returns the final
    activations and, if `return_all`, every block's output stacked [depth, B, T, D]."""
    block = block_class(self.remat_policy, self.scan)
    if decode:
      block = Block
    args = (context, mask, positions, deterministic, decode, index, cache_len)
    if self.scan:

      def body(layer, carry, _):
        out = layer(carry, *args)
        return out, (out if return_all else None)

      scanned = nn.scan(
        body,
        variable_axes={"params": 0, "cache": 1},
        split_rngs={"params": True, "dropout": True},
        length=self.depth,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, hidden = scanned(block(**self.block, name="layers"), x, None)
      return (x, hidden) if return_all else x
    hidden = []
    for i in range(self.depth):
      x = block(**self.block, name=f"block_{i}")(x, *args)
      hidden.append(x)
    return (x, jnp.stack(hidden)) if return_all else x


# ---------------------------------------------------------------------------------------------- presets


def encoder_block(num_heads: int, mlp_dim: int, **kw: Any) -> dict[str, Any]:
  """Block kwargs of a ViT / BERT-style encoder: LayerNorm, GELU MLP, biases everywhere, no rotary,
  bidirectional unless causal=True (CLIP's text tower)."""
  return dict(num_heads=num_heads, mlp_dim=mlp_dim, **kw)


def decoder_block(num_heads: int, mlp_dim: int, cross_attention: bool = False, **kw: Any) -> dict[str, Any]:
  """Block kwargs of a causal (captioning) decoder, CoCa's: the encoder's block with causal
  self-attention and, if cross_attention, a cross-attention branch over the context."""
  return dict(num_heads=num_heads, mlp_dim=mlp_dim, causal=True, cross_attention=cross_attention, **kw)


def lm_block(num_heads: int, mlp_dim: int, **kw: Any) -> dict[str, Any]:
  """Block kwargs of a decoder-only LM (Llama layout; vlm.models.decoder.DecoderLM): RMSNorm, SwiGLU,
  no biases, rotary (theta 1e4) causal self-attention. kw overrides (Qwen2's qkv_bias, Persimmon's
  norm='layer' / qk_norm / rotary_fraction, Chameleon's swin_norm, ...)."""
  base = dict(mlp_act="swiglu", qkv_bias=False, out_bias=False, mlp_bias=False, rope_theta=10000.0, norm="rms")
  return dict(base, num_heads=num_heads, mlp_dim=mlp_dim, causal=True, **kw)


def Encoder(depth: int, scan: bool = False, remat_policy: str = "none", name: str | None = None, **block: Any) -> Stack:
  """A Stack of `depth` encoder_block(**block) blocks (scan / remat_policy as Stack's)."""
  return Stack(depth=depth, block=encoder_block(**block), scan=scan, remat_policy=remat_policy, name=name)


def Decoder(depth: int, scan: bool = False, remat_policy: str = "none", name: str | None = None, **block: Any) -> Stack:
  """A Stack of `depth` decoder_block(**block) blocks (scan / remat_policy as Stack's)."""
  return Stack(depth=depth, block=decoder_block(**block), scan=scan, remat_policy=remat_policy, name=name)
