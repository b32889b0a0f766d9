"""CoCa: Contrastive Captioners (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models").

One image encoder and one text decoder trained with two losses (sec. 3.2):

    images -> ViT tokens -+-> AttentionalPooler(1 query)    -> LN -> proj -> z_img     (contrastive)
                          +-> AttentionalPooler(256 queries) -> LN -> context          (captioner)
    text [BOS w1 .. EOS pad ..] + [CLS] -> unimodal decoder layers (causal, no cross-attention)
        CLS state -> LN -> proj -> z_txt                                                 (contrastive)
        text states -> multimodal decoder layers (causal + cross-attention to context)
        -> LN -> vocabulary logits                                                       (captioning)

The learnable CLS token is appended at the end of the text, so under the causal mask it sees the
whole caption while no text token sees it; it attends to real tokens only (padding masked).
Captioning and contrastive scoring share everything up to the unimodal layers. For generation,
`decode_step` runs the text path without CLS on a KV cache (vlm.decoding's step protocol).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.models import generation, two_tower
from vlm.models.two_tower import CLIP_TEMPERATURE_INIT, LearnedScaleAndBias, l2_normalize
from vlm.models.vit import ViT, decode_variant
from vlm.nn import AttentionalPooler, Decoder, make_norm
from vlm.nn.mlp import dense


class CoCaTextDecoder(nn.Module):
  """Token ids [B, L] -> (CLS state [B, W], logits [B, L, vocab]); unimodal then multimodal layers.

  Sizes come from `variant` (e.g. 'B': width 768, 12 heads, MLP 3072; each half gets the variant's
  depth, CoCa-Base's 12 + 12) and explicit fields override them.
  """

  vocab_size: int
  variant: str | None = None
  width: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  unimodal_depth: int | None = None
  multimodal_depth: int | None = None
  max_len: int = 64
  pad_id: int = 0
  mlp_act: str = "gelu"
  norm_eps: float = 1e-6
  dropout: float = 0.0
  remat_policy: str = "none"
  dtype: Any = None

  def dims(self) -> dict[str, int]:
    v = decode_variant(self.variant)
    d = dict(
      width=v.get("width"),
      mlp_dim=v.get("mlp_dim"),
      num_heads=v.get("num_heads"),
      unimodal_depth=v.get("depth"),
      multimodal_depth=v.get("depth"),
    )
    d.update({k: getattr(self, k) for k in d if getattr(self, k) is not None})
    missing = [k for k, x in d.items() if x is None]
    if missing:
      raise ValueError(f"CoCaTextDecoder needs {missing}: give a variant like 'B' or the explicit fields")
    return d

  def setup(self):
    d = self.dims()
    self.embedding = nn.Embed(
      self.vocab_size,
      d["width"],
      dtype=self.dtype,
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
    )
    # max_len text positions + 1 for the CLS token (open_clip's embed_cls layout).
    self.pos_embedding = self.param(
      "pos_embedding",
      nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "pos", "embed")),
      (1, self.max_len + 1, d["width"]),
    )
    self.cls = self.param(
      "cls", nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, None, "embed")), (1, 1, d["width"])
    )
    common = dict(
      num_heads=d["num_heads"],
      mlp_dim=d["mlp_dim"],
      mlp_act=self.mlp_act,
      norm_eps=self.norm_eps,
      dropout=self.dropout,
      remat_policy=self.remat_policy,
      dtype=self.dtype,
    )
    self.unimodal = Decoder(depth=d["unimodal_depth"], **common)
    self.multimodal = Decoder(depth=d["multimodal_depth"], cross_attention=True, **common)
    self.cls_norm = make_norm("layer", self.norm_eps, self.dtype)
    self.norm = make_norm("layer", self.norm_eps, self.dtype)
    self.head = dense(self.vocab_size, ("embed", "vocab"), use_bias=True, dtype=self.dtype, name="head")

  def _embed(self, tokens: jax.Array, index: jax.Array | int = 0) -> jax.Array:
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"text length {tokens.shape[1]} exceeds the decoder's max_len {self.max_len}")
    pos = jax.lax.dynamic_slice_in_dim(self.pos_embedding, jnp.asarray(index, jnp.int32), tokens.shape[1], axis=1)
    return self.embedding(tokens) + pos.astype(self.dtype or jnp.float32)

  def encode(self, tokens: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Unimodal layers over [text; CLS] -> (CLS state after LN [B, W], text states [B, L, W])."""
    b, length = tokens.shape
    x = self._embed(tokens)
    cls = jnp.broadcast_to(self.cls + self.pos_embedding[:, length : length + 1], (b, 1, x.shape[-1]))
    x = jnp.concatenate([x, cls.astype(x.dtype)], axis=1)
    # Text rows attend causally to everything before them, as in decoding; the CLS row (last)
    # attends to real tokens only.
    keys = jnp.concatenate([tokens != self.pad_id, jnp.ones((b, 1), bool)], axis=1)
    is_cls = (jnp.arange(length + 1) == length)[None, :, None]
    mask = jnp.where(is_cls, keys[:, None, :], True)[:, None]  # [B, 1, L+1, L+1]
    h = self.unimodal(x, mask=mask, deterministic=not train)
    return self.cls_norm(h[:, -1]), h[:, :-1]

  def __call__(self, tokens: jax.Array, context: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    cls_state, h = self.encode(tokens, train)
    y = self.multimodal(h, context, deterministic=not train)
    return cls_state, self.head(self.norm(y))

  def decode_step(
    self, tokens: jax.Array, index: jax.Array | int, context: jax.Array | None = None, cache_len: int | None = None
  ) -> jax.Array:
    """Cached decoding: tokens [B, T] at slots [index, index + T) -> logits [B, T, vocab].

    The call that creates the cache needs `context` (its cross-attention keys are cached) and
    `cache_len`; later calls pass neither.
    """
    h = self.unimodal(self._embed(tokens, index), decode=True, index=index, cache_len=cache_len)
    y = self.multimodal(h, context, decode=True, index=index, cache_len=cache_len)
    return self.head(self.norm(y))


class CoCa(LearnedScaleAndBias, nn.Module):
  """CoCa image encoder + text decoder.

  __call__(images [B,H,W,3], tokens [B,L]) -> (z_img [B,E], z_txt [B,E], out) with out['logits']
  [B, L, vocab] (position t predicts token t+1), 'scale', 'bias' and 'img/encoded'. encode_image /
  encode_text have the TwoTower signatures, so the zero-shot and retrieval evaluations apply.

  image: ViT kwargs (its pool_type is forced to 'none': the poolers below replace it).
  text: CoCaTextDecoder kwargs.
  embed_dim: contrastive embedding size E.
  num_cap_queries / num_con_queries: the two attentional poolers (256 and 1 in the paper, sec. 3.2).
  frozen: ('image',) stops gradients into the ViT and runs it in inference mode (frozen-encoder
  captioning); pair it with optim.frozen for its weights.
  """

  image: dict | None = None
  text: dict | None = None
  embed_dim: int = 512
  num_cap_queries: int = 256
  num_con_queries: int = 1
  pooler_heads: int | None = None
  temperature_init: float = CLIP_TEMPERATURE_INIT
  bias_init: float | None = None
  max_scale: float | None = 100.0
  frozen: tuple[str, ...] = ()
  dtype: Any = None  # compute dtype of both towers and the poolers (a tower's own `dtype` key wins)

  def setup(self):
    unknown = set(self.frozen) - {"image"}
    if unknown:
      raise ValueError(f"CoCa frozen may hold 'image' only, got {sorted(unknown)}")
    image = dict({"dtype": self.dtype, **(self.image or {})}, pool_type="none", out_dim=None)
    self.img = ViT(**image)
    self.txt = CoCaTextDecoder(**{"dtype": self.dtype, **(self.text or {})})
    heads = self.pooler_heads or self.img.dims()["num_heads"]
    self.con_pooler = AttentionalPooler(self.num_con_queries, heads, dtype=self.dtype)
    self.cap_pooler = AttentionalPooler(self.num_cap_queries, heads, dtype=self.dtype)
    self.img_norm = make_norm("layer", 1e-6)
    self.cap_norm = make_norm("layer", 1e-6)
    self.img_proj = dense(self.embed_dim, ("embed", "proj"), use_bias=False, dtype=None, name="img_proj")
    self.txt_proj = dense(self.embed_dim, ("embed", "proj"), use_bias=False, dtype=None, name="txt_proj")
    self.setup_scale_and_bias()

  def image_tokens(self, images: jax.Array, train: bool = False) -> jax.Array:
    """ViT tokens after the final norm [B, T, D]."""
    frozen = "image" in self.frozen
    tokens = self.img(images, train=train and not frozen)[1]["encoded"]
    return jax.lax.stop_gradient(tokens) if frozen else tokens

  def _embed_image(self, tokens: jax.Array) -> jax.Array:
    pooled = jnp.mean(self.con_pooler(tokens), axis=1)
    return l2_normalize(self.img_proj(self.img_norm(pooled)).astype(jnp.float32))

  def caption_context(self, images: jax.Array, train: bool = False) -> jax.Array:
    """The captioner's cross-attention context [B, num_cap_queries, D]."""
    return self.cap_norm(self.cap_pooler(self.image_tokens(images, train)))

  def encode_image(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    tokens = self.image_tokens(images, train)
    return self._embed_image(tokens), {"encoded": tokens}

  def encode_text(self, tokens: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    cls_state, h = self.txt.encode(tokens, train)
    return l2_normalize(self.txt_proj(cls_state).astype(jnp.float32)), {"unimodal": h}

  def decode_step(
    self, tokens: jax.Array, index: jax.Array | int, context: jax.Array | None = None, cache_len: int | None = None
  ) -> jax.Array:
    """See CoCaTextDecoder.decode_step; `context` comes from caption_context."""
    return self.txt.decode_step(tokens, index, context, cache_len)

  def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False):
    img_tokens = self.image_tokens(images, train)
    context = self.cap_norm(self.cap_pooler(img_tokens))
    cls_state, logits = self.txt(tokens, context, train)
    zimg = self._embed_image(img_tokens)
    ztxt = l2_normalize(self.txt_proj(cls_state).astype(jnp.float32))
    out: dict[str, Any] = {"logits": logits, "img/encoded": img_tokens}
    out["scale"], out["bias"] = self.scale_and_bias()
    return zimg, ztxt, out


def predict_fns(model: CoCa) -> dict[str, Any]:
  """The contrastive predict functions (two_tower.predict_fns) and caption(params, images, *, bos_id,
  eos_id, pad_id, max_len, method='greedy', rng=None, **decode_kw) -> DecodeOutput: [BOS], then up to
  max_len - 1 tokens, the cross-attention keys of caption_context cached once (vlm.models.generation)."""

  def caption(params, images, *, bos_id: int, eos_id: int, pad_id: int, max_len: int, **kw):
    context = model.apply({"params": params}, images, method=CoCa.caption_context)
    prompt = jnp.full((images.shape[0], 1), bos_id, jnp.int32)
    return generation.generate(
      model,
      params,
      prompt,
      cache_inputs={"context": context},
      max_new_tokens=max_len - 1,
      eos_id=eos_id,
      pad_id=pad_id,
      **kw,
    )

  return dict(two_tower.predict_fns(model), caption=caption)
