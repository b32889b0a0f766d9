"""Mixture-of-Modality-Experts transformer (VLMo, Bao et al. 2022, sec. 2.1).

Every block has one self-attention shared by all modalities and a pool of feed-forward experts
chosen by the modality of each token: V-FFN for image tokens, L-FFN for text tokens, and, in the
top `vl_layers` blocks only, VL-FFN for the tokens of a fused [text; image] sequence. The same
stack is an image encoder (mode 'image': V-FFN everywhere), a text encoder ('text': L-FFN
everywhere) or a fusion encoder ('fused': bottom blocks route text tokens to L-FFN and image
tokens to V-FFN, top blocks send all tokens to VL-FFN).

Routing is by position, so it is static: a fused sequence is [text (num_text tokens); image].
Parameter names: block_{i}/{norm1, attn, expert_v, expert_l, expert_vl}; stage 2 of VLMo
freezes `attn`, `norm1` and `expert_v` by regex on these names.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.nn.attention import MultiHeadAttention
from vlm.nn.mlp import Mlp
from vlm.nn.norms import make_norm
from vlm.nn.transformer import REMAT_POLICIES, DropPath

MODES = ("image", "text", "fused")


class LayerScale(nn.Module):
  """Per-channel learned residual scale, initialised at `init` (CaiT; BEiT and VLMo use 0.1 for base)."""

  init: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param(
      "scale", nn.with_logical_partitioning(nn.initializers.constant(self.init), ("embed",)), (x.shape[-1],)
    )
    return x * gamma.astype(x.dtype)


class Expert(nn.Module):
  """One modality expert: LN -> MLP (VLMo gives each expert its own pre-FFN norm)."""

  mlp_dim: int
  mlp_act: str = "gelu"
  norm_eps: float = 1e-6
  dropout: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    y = make_norm("layer", self.norm_eps, self.dtype, name="norm")(x)
    return Mlp(self.mlp_dim, act=self.mlp_act, dropout=self.dropout, dtype=self.dtype, name="mlp")(y, deterministic)


class MoMEBlock(nn.Module):
  """x + Attn(LN x) (shared); x + Expert_m(x) with m chosen per token. x: [B, T, D].

  mode: 'image' | 'text' | 'fused'; in 'fused' mode the first num_text tokens are text and the
  rest image, and a block with vl_expert=True sends every token to the VL expert.
  """

  num_heads: int
  mlp_dim: int
  vl_expert: bool = False
  mlp_act: str = "gelu"
  norm_eps: float = 1e-6
  layer_scale: float | None = None
  dropout: float = 0.0
  droppath: float = 0.0
  dtype: Any = None

  def _expert(self, name: str) -> Expert:
    return Expert(self.mlp_dim, self.mlp_act, self.norm_eps, self.dropout, self.dtype, name=f"expert_{name}")

  def _scale(self, name: str):
    return LayerScale(self.layer_scale, name=name) if self.layer_scale is not None else (lambda y: y)

  @nn.compact
  def __call__(
    self, x: jax.Array, mode: str, num_text: int = 0, mask: jax.Array | None = None, deterministic: bool = True
  ) -> jax.Array:
    if mode not in MODES:
      raise ValueError(f"unknown MoME mode {mode!r}; known: {MODES}")
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
    y = make_norm("layer", self.norm_eps, self.dtype, name="norm1")(x)
    y = MultiHeadAttention(num_heads=self.num_heads, norm_eps=self.norm_eps, dtype=self.dtype, name="attn")(
      y, mask=mask
    )
    y = nn.Dropout(self.dropout)(y, deterministic)
    x = x + DropPath(self.droppath)(self._scale("ls1")(y), deterministic)
    if mode == "image":
      y = self._expert("v")(x, deterministic)
    elif mode == "text":
      y = self._expert("l")(x, deterministic)
    elif self.vl_expert:
      y = self._expert("vl")(x, deterministic)
    else:
      if not 0 < num_text < x.shape[1]:
        raise ValueError(f"fused mode needs 0 < num_text < sequence length {x.shape[1]}, got {num_text}")
      y = jnp.concatenate(
        [self._expert("l")(x[:, :num_text], deterministic), self._expert("v")(x[:, num_text:], deterministic)], axis=1
      )
    y = nn.Dropout(self.dropout)(y, deterministic)
    x = x + DropPath(self.droppath)(self._scale("ls2")(y), deterministic)
    return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))


class MoMEEncoder(nn.Module):
  """`depth` MoME blocks; the top `vl_layers` have a VL expert (VLMo-Base: 2 of 12; Large: 3 of 24).

  __call__(x [B, T, D], mode, num_text, mask) -> [B, T, D] (no final norm; the model owns it).
  """

  depth: int
  num_heads: int
  mlp_dim: int
  vl_layers: int = 2
  mlp_act: str = "gelu"
  norm_eps: float = 1e-6
  layer_scale: float | None = None
  dropout: float = 0.0
  droppath: float = 0.0
  remat_policy: str = "none"
  dtype: Any = None

  @nn.compact
  def __call__(
    self, x: jax.Array, mode: str, num_text: int = 0, mask: jax.Array | None = None, deterministic: bool = True
  ) -> jax.Array:
    if not 0 <= self.vl_layers <= self.depth:
      raise ValueError(f"vl_layers={self.vl_layers} must be in [0, depth={self.depth}]")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; known: {sorted(REMAT_POLICIES)}")
    block = MoMEBlock
    if self.remat_policy != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy], static_argnums=(2, 3, 5))
    for i in range(self.depth):
      # Stochastic depth grows linearly with depth (BEiT / VLMo).
      rate = self.droppath * i / max(self.depth - 1, 1)
      x = block(
        self.num_heads,
        self.mlp_dim,
        vl_expert=i >= self.depth - self.vl_layers,
        mlp_act=self.mlp_act,
        norm_eps=self.norm_eps,
        layer_scale=self.layer_scale,
        dropout=self.dropout,
        droppath=rate,
        dtype=self.dtype,
        name=f"block_{i}",
      )(x, mode, num_text, mask, deterministic)
    return x
