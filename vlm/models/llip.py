"""Llip (Lavoie et al. 2024, "Modeling Caption Diversity in Contrastive Vision-Language Pretraining").

The image tower outputs K learned visual mixture tokens instead of one embedding. A caption's
embedding gives a query that cross-attends over the K tokens, so each (image, caption) pair has
its own caption-conditioned image embedding (sec. 3):

    z_ij = W_v v_i softmax_k(<W_q t_j, W_k v_ik> / tau)    (per head, heads concatenated)
    logit_ij = scale * <z_ij / |z_ij|, t_j / |t_j|> + bias

with K = 32 for B/16, 8 heads and tau = 5 (sec. 4), trained with the sigmoid loss (bias init -10).
There is no output projection after the heads. The temperature tau replaces the usual
1 / sqrt(head_dim) scaling.

The contrastive loss needs logits for every image-caption pair of the global batch, so the model
hands out the two sides (`encode_image`: keys and values of the K tokens, `encode_text`: query
and caption embedding) and a similarity function, `llip_similarity`. The shared loss module
(`vlm.losses.pairwise_contrastive_loss`) runs that function on [b, B] blocks (all_gather) or
[b, b] blocks with the text side travelling around the ring.
"""

from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.models import two_tower
from vlm.models.text import TextTransformer
from vlm.models.two_tower import SIGLIP_BIAS_INIT, SIGLIP_TEMPERATURE_INIT, LearnedScaleAndBias, l2_normalize
from vlm.models.vit import ViT
from vlm.nn.mlp import dense

# Llip sec. 4: K = 32 mixture tokens for ViT-B/16, 8 cross-attention heads, softmax temperature 5.
LLIP_MIXTURE_TOKENS = 32
LLIP_HEADS = 8
LLIP_ATTN_TEMPERATURE = 5.0


def llip_image_embedding(img: dict, txt: dict, temperature: float) -> jax.Array:
  """Caption-conditioned image embeddings: img {'keys', 'values': [I, K, H, d]}, txt {'query':
  [J, H, d]} -> unit-norm z [I, J, H * d], image i attended by caption j's query."""
  attn = jnp.einsum("ikhd,jhd->ijhk", img["keys"], txt["query"]) / temperature
  attn = jax.nn.softmax(attn, axis=-1)
  z = jnp.einsum("ijhk,ikhd->ijhd", attn, img["values"])
  return l2_normalize(z.reshape(*z.shape[:2], -1))


def llip_similarity(img: dict, txt: dict, temperature: float) -> jax.Array:
  """Cosine similarity [I, J] of each caption-conditioned image embedding with its caption."""
  return jnp.einsum("ijd,jd->ij", llip_image_embedding(img, txt, temperature), l2_normalize(txt["z"]))


class MixtureViT(ViT):
  """Llip's image tower: a ViT with `num_mixture_tokens` K learned tokens ('extra_tokens' [1, K, width])
  in front of the sequence after the position embeddings; their outputs are aux['extra'] [B, K, width]."""

  num_mixture_tokens: int = LLIP_MIXTURE_TOKENS

  def prefix_tokens(self, batch: int, width: int) -> jax.Array | None:
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed"))
    extra = self.param("extra_tokens", init, (1, self.num_mixture_tokens, width))
    return jnp.tile(extra, (batch, 1, 1))


class Llip(LearnedScaleAndBias, nn.Module):
  """ViT with K mixture tokens + text transformer + query cross-attention (see the module doc).

  __call__(images [B,H,W,3] | None, tokens [B,L] | None) -> (img, txt, out): img = {'keys',
  'values'} [B, K, heads, D / heads], txt = {'query' [B, heads, D / heads], 'z' [B, D] unit-norm},
  out = scale, bias and each tower's aux. D is the text tower's out_dim.
  `similarity_fn()` gives sim(img [I], txt [J]) -> [I, J] for the loss and the evaluations.
  """

  image: dict | None = None
  text: dict | None = None
  num_mixture_tokens: int = LLIP_MIXTURE_TOKENS
  num_heads: int = LLIP_HEADS
  attn_temperature: float = LLIP_ATTN_TEMPERATURE
  temperature_init: float = SIGLIP_TEMPERATURE_INIT
  bias_init: float | None = SIGLIP_BIAS_INIT
  max_scale: float | None = None
  dtype: Any = None

  def setup(self):
    image = dict(self.image or {})
    for key in ("pool_type", "out_dim", "num_mixture_tokens"):
      if key in image:
        raise ValueError(
          f"model.image.{key}: Llip's image tower emits its {self.num_mixture_tokens} mixture "
          "tokens (model.num_mixture_tokens) unpooled; remove the key"
        )
    text = dict(self.text or {})
    if not text.get("out_dim"):
      raise ValueError("model.text.out_dim: Llip needs the embedding size D (the text head's output)")
    self.embed_dim = text["out_dim"]
    if self.embed_dim % self.num_heads:
      raise ValueError(f"model.num_heads={self.num_heads} must divide model.text.out_dim={self.embed_dim}")
    if self.num_mixture_tokens < 1:
      raise ValueError(f"model.num_mixture_tokens must be >= 1, got {self.num_mixture_tokens}")
    self.img = MixtureViT(
      **{"dtype": self.dtype, **image}, pool_type="none", num_mixture_tokens=self.num_mixture_tokens, name="img"
    )
    self.txt = TextTransformer(**{"dtype": self.dtype, **text}, name="txt")
    proj = partial(dense, self.embed_dim, ("embed", "proj"), use_bias=True, dtype=self.dtype)
    self.key_proj, self.value_proj, self.query_proj = proj(name="key"), proj(name="value"), proj(name="query")
    self.setup_scale_and_bias()

  def _heads(self, x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_heads, -1)

  def encode_image(self, images: jax.Array, train: bool = False) -> tuple[dict, dict]:
    _, aux = self.img(images, train=train)
    mix = aux["extra"]  # [B, K, width]
    return {"keys": self._heads(self.key_proj(mix)), "values": self._heads(self.value_proj(mix))}, aux

  def encode_text(self, tokens: jax.Array, train: bool = False) -> tuple[dict, dict]:
    t, aux = self.txt(tokens, train=train)
    return {"query": self._heads(self.query_proj(t)), "z": l2_normalize(t.astype(jnp.float32))}, aux

  def similarity_fn(self) -> Callable[[dict, dict], jax.Array]:
    """sim(img [I], txt [J]) -> [I, J] cosines; parameter-free, so usable on the unbound module."""
    return partial(llip_similarity, temperature=self.attn_temperature)

  def __call__(self, images: jax.Array | None, tokens: jax.Array | None, train: bool = False):
    out: dict[str, Any] = {}
    img = txt = None
    if images is not None:
      img, aux = self.encode_image(images, train)
      out.update({f"img/{k}": v for k, v in aux.items() if k != "extra"})
    if tokens is not None:
      txt, aux = self.encode_text(tokens, train)
      out.update({f"txt/{k}": v for k, v in aux.items()})
    out["scale"], out["bias"] = self.scale_and_bias()
    return img, txt, out


def predict_fns(model: Llip) -> dict[str, Any]:
  """The contrastive predict functions (two_tower.predict_fns: embed_image / embed_text give pytree
  sides) and pair_similarity(z_img, z_txt) -> [I, J], the caption-conditioned cosines."""
  return dict(two_tower.predict_fns(model), pair_similarity=model.similarity_fn())
