"""Two-tower contrastive model: CLIP (Radford et al. 2021), SigLIP (Zhai et al. 2023), LiT (Zhai et al. 2022)."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.models.text import TextTransformer
from vlm.models.vit import ViT

# Published initialisations of the learnable temperature t' (scale = exp(t')) and bias.
CLIP_TEMPERATURE_INIT = math.log(1 / 0.07)  # CLIP sec. 2.5; scale clamped at 100
SIGLIP_TEMPERATURE_INIT = math.log(10.0)  # SigLIP sec. 3.2: t' = log 10, b = -10
SIGLIP_BIAS_INIT = -10.0


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class LearnedScaleAndBias:
  """Mixin for contrastive models: the learnable temperature t' (scale = exp(t'), clamped at
  max_scale) and the optional bias b, as top-level parameters 't' and 'b'.

  The module needs fields temperature_init, bias_init (None: no bias) and max_scale, and calls
  `self.setup_scale_and_bias()` in its setup().
  """

  def setup_scale_and_bias(self) -> None:
    self.t = self.param(
      "t", nn.with_logical_partitioning(nn.initializers.constant(self.temperature_init), (None,)), (1,)
    )
    if self.bias_init is not None:
      self.b = self.param("b", nn.with_logical_partitioning(nn.initializers.constant(self.bias_init), (None,)), (1,))

  def scale_and_bias(self) -> tuple[jax.Array, jax.Array | None]:
    scale = jnp.exp(self.t[0])
    if self.max_scale is not None:
      scale = jnp.minimum(scale, self.max_scale)
    return scale, (self.b[0] if self.bias_init is not None else None)


class TwoTower(LearnedScaleAndBias, nn.Module):
  """Image tower (ViT) + text tower (TextTransformer) -> L2-normalised embeddings.

  __call__(images [B,H,W,3] | None, tokens [B,L] | None) -> (zimg [B,E], ztxt [B,E], out)
  where out has 'scale' (= exp(t'), clamped at max_scale), 'bias' (or None) and each
  tower's aux under 'img/...' and 'txt/...'.
  frozen: towers ('image' and/or 'text') whose outputs are stop-gradient'ed and run in
  inference mode (LiT: "locked image tuning"); pair it with optim.frozen for the weights.
  """

  image: dict | None = None
  text: dict | None = None
  temperature_init: float = SIGLIP_TEMPERATURE_INIT
  bias_init: float | None = SIGLIP_BIAS_INIT
  max_scale: float | None = None
  frozen: tuple[str, ...] = ()
  dtype: Any = None

  def setup(self):
    unknown = set(self.frozen) - {"image", "text"}
    if unknown:
      raise ValueError(f"model.frozen may hold 'image' and 'text', got {sorted(unknown)}")
    self.img = ViT(**{"dtype": self.dtype, **(self.image or {})}, name="img")
    self.txt = TextTransformer(**{"dtype": self.dtype, **(self.text or {})}, name="txt")
    self.setup_scale_and_bias()

  def encode_image(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    frozen = "image" in self.frozen
    z, aux = self.img(images, train=train and not frozen)
    z = l2_normalize(z.astype(jnp.float32))
    return (jax.lax.stop_gradient(z) if frozen else z), aux

  def encode_text(self, tokens: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    frozen = "text" in self.frozen
    z, aux = self.txt(tokens, train=train and not frozen)
    z = l2_normalize(z.astype(jnp.float32))
    return (jax.lax.stop_gradient(z) if frozen else z), aux

  def __call__(self, images: jax.Array | None, tokens: jax.Array | None, train: bool = False):
    out: dict[str, Any] = {}
    zimg = ztxt = None
    if images is not None:
      zimg, aux = self.encode_image(images, train)
      out.update({f"img/{k}": v for k, v in aux.items()})
    if tokens is not None:
      ztxt, aux = self.encode_text(tokens, train)
      out.update({f"txt/{k}": v for k, v in aux.items()})
    out["scale"], out["bias"] = self.scale_and_bias()
    return zimg, ztxt, out


def predict_fns(model: nn.Module) -> dict[str, Any]:
  """The contrastive predict functions of a model with encode_image / encode_text -> (z, aux) and
  scale_and_bias (two-tower, FLAVA, BLIP-2's Q-Former, VLMo, CoCa, Llip): embed_image(params, images
  [B, H, W, 3]) -> z_img ([B, E], [B, Q, E] for one per query, or a pytree), embed_text(params, tokens
  [B, L]) -> z_txt, image_features(params, images) -> the image encoder's aux (e.g. 'encoded' tokens
  [B, T, D], frozen-feature probes), scale_and_bias(params) -> (scale, bias or None)."""
  cls = type(model)
  return {
    "embed_image": lambda params, images: model.apply({"params": params}, images, method=cls.encode_image)[0],
    "embed_text": lambda params, tokens: model.apply({"params": params}, tokens, method=cls.encode_text)[0],
    "image_features": lambda params, images: model.apply(
      {"params": params}, images, train=False, method=cls.encode_image
    )[1],
    "scale_and_bias": lambda params: model.apply({"params": params}, method=cls.scale_and_bias),
  }
