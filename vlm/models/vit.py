"""Vision Transformer (Dosovitskiy et al. 2021) with big_vision's named variants.

Covers the CLIP layout (class token, pre-norm before the encoder, CLS pooling, bias-free
patch embedding) and the SigLIP layout (no class token, MAP pooling) by configuration.
"""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.nn import Encoder, LearnedPosEmb, MAPHead, PatchEmbed, make_norm, pool, sincos2d
from vlm.nn.mlp import dense

# width, depth, mlp_dim, num_heads. Zhai et al. 2022 ("Scaling ViTs", Table 2) and
# Alabdulmohsin et al. 2023 (So400m, "Getting ViT in Shape").
VIT_VARIANTS: dict[str, tuple[int, int, int, int]] = {
  "mu": (144, 12, 576, 3),
  "Ti": (192, 12, 768, 3),
  "S": (384, 12, 1536, 6),
  "M": (512, 12, 2048, 8),
  "B": (768, 12, 3072, 12),
  "L": (1024, 24, 4096, 16),
  "So400m": (1152, 27, 4304, 16),
  "H": (1280, 32, 5120, 16),
  "g": (1408, 40, 6144, 16),
  "G": (1664, 48, 8192, 16),
}


def decode_variant(variant: str | None) -> dict[str, Any]:
  """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=(16, 16)).

  'B' (no patch) gives the tower sizes only, as text towers use. Unknown names raise.
  """
  if variant is None:
    return {}
  m = re.fullmatch(r"([A-Za-z0-9]+?)(?:/(\d+)(?:x(\d+))?)?", variant)
  if m is None or m.group(1) not in VIT_VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; known: {sorted(VIT_VARIANTS)} with an optional '/patch'")
  width, depth, mlp_dim, heads = VIT_VARIANTS[m.group(1)]
  out: dict[str, Any] = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads)
  if m.group(2):
    p = int(m.group(2))
    out["patch_size"] = (p, int(m.group(3)) if m.group(3) else p)
  return out


def resolve_dims(module: nn.Module, keys: tuple[str, ...]) -> dict[str, Any]:
  """module.variant's sizes, overridden by the module's explicit (non-None) fields `keys`."""
  d = decode_variant(module.variant)
  d.update({k: getattr(module, k) for k in keys if getattr(module, k) is not None})
  missing = [k for k in keys if k not in d]
  if missing:
    raise ValueError(f"{type(module).__name__} needs {missing}: give a variant like 'B/16' or the explicit fields")
  return d


class ViT(nn.Module):
  """Images [B, H, W, 3] -> (pooled embedding [B, out_dim or width], aux dict).

  aux holds 'encoded' (final tokens after the final norm, [B, T, width]), 'pre_logits'
  (pooled, before the head) and, with return_all_layers, 'hidden' ([depth, B, T, width],
  each block's output before the final norm) for penultimate-layer features.
  Explicit width/depth/mlp_dim/num_heads/patch_size override those of `variant`.

  Two methods are the hooks of a family's subclass (variants as subclasses, not flags here; both are
  called inside __call__, so an override may create parameters):
  - mask_patches(x, patch_mask): the patch embeddings [B, gh * gw, width] before the class token and
    the position embeddings are added. A plain ViT takes no patch_mask; masked image modelling
    replaces the masked ones by a learned token (BEiT's, vlm.models.flava.MaskedViT).
  - prefix_tokens(batch, width): learned tokens [B, K, width] put in front of the sequence after the
    position embeddings (Llip's visual mixture tokens, vlm.models.llip.MixtureViT). Their outputs are
    aux['extra'] [B, K, width]; 'encoded' and the pooling see the other tokens only.

  final_norm=False drops the final LayerNorm: 'encoded' (and what is pooled) is then the last
  block's output, for an owner that normalises itself (FLAVA with fuse_prenorm).
  """

  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  patch_size: tuple[int, int] | int | None = None
  posemb: str = "learn"  # 'learn' or 'sincos2d'
  posemb_grid: tuple[int, int] | None = None  # learned grid; default: from the first input
  class_token: bool = False
  pool_type: str = "map"  # 'cls', 'gap', 'map', 'none'
  pre_norm: bool = False  # CLIP's LayerNorm on the embeddings before the encoder
  patch_bias: bool = True
  out_dim: int | None = None  # linear head after pooling (None: no head)
  head_bias: bool = True
  head_zeroinit: bool = False
  mlp_act: str = "gelu"
  norm_eps: float = 1e-6
  dropout: float = 0.0
  droppath: float = 0.0
  scan: bool = False
  remat_policy: str = "none"
  return_all_layers: bool = False
  final_norm: bool = True
  dtype: Any = None

  def mask_patches(self, x: jax.Array, patch_mask: jax.Array | None) -> jax.Array:
    """Patch embeddings x [B, N, width] with the patches of patch_mask [B, N] bool masked; a plain ViT
    has no mask token, so it takes no patch_mask."""
    if patch_mask is not None:
      raise ValueError(
        f"{type(self).__name__} got a patch_mask but has no mask token: masked image modelling needs "
        "vlm.models.flava.MaskedViT (BEiT's learned mask token)"
      )
    return x

  def prefix_tokens(self, batch: int, width: int) -> jax.Array | None:
    """Tokens [batch, K, width] to put in front of the position-embedded sequence, or None (a plain ViT).
    Called inside __call__, so an override may create parameters."""
    return None

  def dims(self) -> dict[str, Any]:
    d = resolve_dims(self, ("width", "depth", "mlp_dim", "num_heads", "patch_size"))
    if isinstance(d["patch_size"], int):
      d["patch_size"] = (d["patch_size"],) * 2
    return d

  @nn.compact
  def __call__(
    self, images: jax.Array, train: bool = False, patch_mask: jax.Array | None = None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    dims = self.dims()
    images = jnp.asarray(images, self.dtype or jnp.float32)
    x = PatchEmbed(
      dims["width"], tuple(dims["patch_size"]), use_bias=self.patch_bias, dtype=self.dtype, name="embedding"
    )(images)
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    if patch_mask is not None and patch_mask.shape != (b, gh * gw):
      raise ValueError(
        f"patch_mask has shape {patch_mask.shape}; this image gives {(b, gh * gw)} (a {gh}x{gw} patch grid)"
      )
    x = self.mask_patches(x, patch_mask)
    if self.posemb == "learn":
      grid = self.posemb_grid or (gh, gw)
      if tuple(grid) != (gh, gw):
        raise ValueError(
          f"image grid {(gh, gw)} differs from the learned position grid {tuple(grid)}; "
          "resample the checkpoint with vlm.nn.resample_posemb"
        )
    if self.class_token:
      cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")), (1, 1, d))
      x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)).astype(x.dtype), x], axis=1)
    if self.posemb == "learn":
      x = LearnedPosEmb(x.shape[1], stddev=1 / d**0.5, name="pos_embedding")(x)
    elif self.posemb == "sincos2d":
      pe = sincos2d(gh, gw, d).astype(x.dtype)
      if self.class_token:
        pe = jnp.concatenate([jnp.zeros((1, 1, d), x.dtype), pe], axis=1)
      x = x + pe
    else:
      raise ValueError(f"unknown posemb {self.posemb!r}; known: 'learn', 'sincos2d'")
    extra = self.prefix_tokens(b, d)
    k = 0 if extra is None else extra.shape[1]
    if k:
      x = jnp.concatenate([extra.astype(x.dtype), x], axis=1)
    if self.pre_norm:
      x = make_norm("layer", self.norm_eps, self.dtype, name="pre_norm")(x)
    x = nn.Dropout(self.dropout)(x, not train)
    enc = Encoder(
      depth=dims["depth"],
      num_heads=dims["num_heads"],
      mlp_dim=dims["mlp_dim"],
      mlp_act=self.mlp_act,
      norm_eps=self.norm_eps,
      dropout=self.dropout,
      droppath=self.droppath,
      scan=self.scan,
      remat_policy=self.remat_policy,
      dtype=self.dtype,
      name="encoder",
    )(x, deterministic=not train, return_all=self.return_all_layers)
    aux: dict[str, jax.Array] = {}
    if self.return_all_layers:
      x, aux["hidden"] = enc
    else:
      x = enc
    if self.final_norm:
      x = make_norm("layer", self.norm_eps, self.dtype, name="encoder_norm")(x)
    if k:
      aux["extra"], x = x[:, :k], x[:, k:]
    aux["encoded"] = x
    if self.pool_type == "map":
      x = MAPHead(
        num_heads=dims["num_heads"],
        mlp_dim=dims["mlp_dim"],
        mlp_act=self.mlp_act,
        norm_eps=self.norm_eps,
        dtype=self.dtype,
        name="MAPHead",
      )(x)
    elif self.pool_type == "cls":
      if not self.class_token:
        raise ValueError("pool_type='cls' needs class_token=True")
      x = x[:, 0]
    elif self.pool_type == "gap":
      x = pool(x[:, 1:] if self.class_token else x, "gap")
    elif self.pool_type != "none":
      raise ValueError(f"unknown ViT pool_type {self.pool_type!r}; known: 'cls', 'gap', 'map', 'none'")
    aux["pre_logits"] = x
    if self.out_dim is not None:
      kinit = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
      x = dense(
        self.out_dim, ("embed", "proj"), use_bias=self.head_bias, dtype=self.dtype, name="head", kernel_init=kinit
      )(x)
    return x, aux
