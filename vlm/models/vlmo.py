"""VLMo: unified vision-language pretraining with mixture-of-modality-experts (Bao et al. 2022).

One MoME transformer (vlm.nn.mome) serves three ways:

    images -> [CLS_img; patches] + pos + type(1) -> MoME 'image' (V-FFN)  -> LN -> CLS -> proj -> z_img
    text [BOS(=CLS) w1 .. EOS pad] + pos + type(0) -> MoME 'text' (L-FFN) -> LN -> CLS -> proj -> z_txt
    [text; image] -> MoME 'fused' (L-/V-FFN below, VL-FFN in the top vl_layers) -> LN
        text CLS -> pooler (dense, tanh) -> ITM head (2) / VQA head (answers)
        text positions -> MLM head (vocabulary)

The dual encoder (z_img, z_txt) gives retrieval and zero-shot with the `encode_image` /
`encode_text` signatures of TwoTower; the fusion encoder gives ITM and classification (VQA).
Masked image modelling (stage 1, BEiT) replaces masked patch embeddings by a learned mask token and
predicts the codes of a frozen discrete tokenizer (submodule `tokenizer`, vlm.models.vq) with the
MIM head.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.models import two_tower
from vlm.models.two_tower import CLIP_TEMPERATURE_INIT, LearnedScaleAndBias, l2_normalize
from vlm.nn import MaskedPredictionHead, PatchEmbed, make_attention_mask, make_norm
from vlm.nn.mlp import dense, get_activation
from vlm.nn.mome import MoMEEncoder


class VLMo(LearnedScaleAndBias, nn.Module):
  """Sizes default to VLMo-Base (sec. 3.1): ViT-B/16 layout, 12 layers, width 768, 12 heads, MLP
  3072, VL-FFN in the top 2 layers, 224 px, 40 text tokens, layer scale 0.1 (BEiT). vocab_size
  includes the [MASK] id (the tokenizer's vocabulary + 1 when it has no mask piece).
  """

  vocab_size: int = 30523
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  vl_layers: int = 2
  patch_size: int = 16
  image_size: int = 224
  max_len: int = 40
  pad_id: int = 0
  out_dim: int | None = None  # contrastive embedding size (None: width)
  num_answers: int | None = None  # VQA classifier (None: no VQA head)
  codebook_size: int | None = None  # MIM head over the tokenizer's codes (None: no MIM head)
  tokenizer: dict | None = None  # VQTokenizer kwargs (frozen; load its workdir with init.mapping)
  layer_scale: float | None = 0.1
  mlp_act: str = "gelu"
  norm_eps: float = 1e-6
  dropout: float = 0.0
  droppath: float = 0.0
  remat_policy: str = "none"
  temperature_init: float = CLIP_TEMPERATURE_INIT
  bias_init: float | None = None
  max_scale: float | None = 100.0
  dtype: Any = None

  @property
  def grid(self) -> int:
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
    return self.image_size // self.patch_size

  def setup(self):
    d, init = self.width, nn.initializers.normal(0.02)
    self.patch_embed = PatchEmbed(d, (self.patch_size, self.patch_size), dtype=self.dtype, name="patch_embed")
    self.cls_image = self.param("cls_image", nn.with_logical_partitioning(init, (None, None, "embed")), (1, 1, d))
    self.mask_token = self.param("mask_token", nn.with_logical_partitioning(init, (None, None, "embed")), (1, 1, d))
    self.pos_image = self.param(
      "pos_image", nn.with_logical_partitioning(init, (None, "pos", "embed")), (1, 1 + self.grid**2, d)
    )
    self.word_embed = nn.Embed(
      self.vocab_size,
      d,
      dtype=self.dtype,
      name="word_embed",
      embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
    )
    self.pos_text = self.param(
      "pos_text", nn.with_logical_partitioning(init, (None, "pos", "embed")), (1, self.max_len, d)
    )
    self.type_embed = self.param("type_embed", nn.with_logical_partitioning(init, (None, "embed")), (2, d))
    self.encoder = MoMEEncoder(
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      vl_layers=self.vl_layers,
      mlp_act=self.mlp_act,
      norm_eps=self.norm_eps,
      layer_scale=self.layer_scale,
      dropout=self.dropout,
      droppath=self.droppath,
      remat_policy=self.remat_policy,
      dtype=self.dtype,
      name="encoder",
    )
    self.norm = make_norm("layer", self.norm_eps, self.dtype, name="norm")
    out = self.out_dim or d
    self.itc_image = dense(out, ("embed", "proj"), use_bias=False, dtype=self.dtype, name="itc_image")
    self.itc_text = dense(out, ("embed", "proj"), use_bias=False, dtype=self.dtype, name="itc_text")
    self.pooler = dense(d, ("embed", "mlp"), use_bias=True, dtype=self.dtype, name="pooler")
    self.itm_head = dense(2, ("mlp", None), use_bias=True, dtype=self.dtype, name="itm_head")
    self.mlm_head = MaskedPredictionHead(self.vocab_size, norm_eps=self.norm_eps, dtype=self.dtype, name="mlm_head")
    if self.codebook_size:
      self.mim_head = dense(self.codebook_size, ("embed", "vocab"), use_bias=True, dtype=self.dtype, name="mim_head")
    if self.num_answers:
      # VLMo's VQA classifier: pooled -> Linear(2D) -> LN -> GELU -> Linear(answers).
      self.vqa_dense = dense(2 * d, ("embed", "mlp"), use_bias=True, dtype=self.dtype, name="vqa_dense")
      self.vqa_norm = make_norm("layer", self.norm_eps, self.dtype, name="vqa_norm")
      self.vqa_head = dense(self.num_answers, ("mlp", None), use_bias=True, dtype=self.dtype, name="vqa_head")
    if self.tokenizer is not None:
      from vlm.models.vq import VQTokenizer

      self.image_tokenizer = VQTokenizer(**self.tokenizer, name="tokenizer")
    self.setup_scale_and_bias()

  # -- embeddings ---------------------------------------------------------------------------------

  def embed_image(self, images: jax.Array, patch_mask: jax.Array | None = None) -> jax.Array:
    """images [B, H, W, 3] -> [B, 1 + N, D]; patch_mask [B, N] True -> the patch becomes the mask token."""
    x = self.patch_embed(jnp.asarray(images, self.dtype or jnp.float32))
    b, gh, gw, d = x.shape
    if (gh, gw) != (self.grid, self.grid):
      raise ValueError(
        f"images {images.shape[1:3]} give a {gh}x{gw} patch grid; the model was built for "
        f"image_size={self.image_size}, patch_size={self.patch_size} ({self.grid}x{self.grid})"
      )
    x = x.reshape(b, gh * gw, d)
    if patch_mask is not None:
      x = jnp.where(patch_mask[..., None], self.mask_token.astype(x.dtype), x)
    x = jnp.concatenate([jnp.broadcast_to(self.cls_image, (b, 1, d)).astype(x.dtype), x], axis=1)
    return x + (self.pos_image + self.type_embed[1]).astype(x.dtype)

  def embed_text(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """tokens [B, T] -> (embeddings [B, T, D], valid [B, T]); T <= max_len."""
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"text length {tokens.shape[1]} exceeds max_len {self.max_len}")
    x = self.word_embed(tokens)
    x = x + (self.pos_text[:, : tokens.shape[1]] + self.type_embed[0]).astype(x.dtype)
    return x, tokens != self.pad_id

  # -- the three uses of the MoME stack ------------------------------------------------------------

  def image_tokens(self, images: jax.Array, patch_mask: jax.Array | None = None, train: bool = False) -> jax.Array:
    """Image-only encoder (V-FFN in every layer): [B, 1 + N, D] after the final norm."""
    x = self.embed_image(images, patch_mask)
    return self.norm(self.encoder(x, "image", deterministic=not train))

  def text_tokens(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    """Text-only encoder (L-FFN in every layer), padding masked: [B, T, D] after the final norm."""
    x, valid = self.embed_text(tokens)
    return self.norm(self.encoder(x, "text", mask=make_attention_mask(None, valid), deterministic=not train))

  def fused_tokens(self, images: jax.Array, tokens: jax.Array, train: bool = False) -> jax.Array:
    """Fusion encoder over [text; image]: [B, T + 1 + N, D] after the final norm."""
    t, valid = self.embed_text(tokens)
    v = self.embed_image(images)
    valid = jnp.concatenate([valid, jnp.ones(v.shape[:2], bool)], axis=1)
    x = jnp.concatenate([t, v], axis=1)
    x = self.encoder(
      x, "fused", num_text=tokens.shape[1], mask=make_attention_mask(None, valid), deterministic=not train
    )
    return self.norm(x)

  # -- heads --------------------------------------------------------------------------------------

  def encode_image(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    """Dual-encoder image embedding [B, E] (L2-normalised CLS projection)."""
    x = self.image_tokens(images, train=train)
    return l2_normalize(self.itc_image(x[:, 0]).astype(jnp.float32)), {"encoded": x}

  def encode_text(self, tokens: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    """Dual-encoder text embedding [B, E] (L2-normalised projection of the first (BOS/CLS) token)."""
    x = self.text_tokens(tokens, train=train)
    return l2_normalize(self.itc_text(x[:, 0]).astype(jnp.float32)), {"encoded": x}

  def pooled(self, images: jax.Array, tokens: jax.Array, train: bool = False) -> jax.Array:
    """tanh(dense(fused text CLS)) [B, D], shared by the ITM and VQA heads."""
    return jnp.tanh(self.pooler(self.fused_tokens(images, tokens, train)[:, 0]))

  def itm_logits(self, images: jax.Array, tokens: jax.Array, train: bool = False) -> jax.Array:
    """Match / no-match logits [B, 2] (index 1: the pair matches)."""
    return self.itm_head(self.pooled(images, tokens, train))

  def mlm_logits(self, tokens: jax.Array, images: jax.Array | None = None, train: bool = False) -> jax.Array:
    """Vocabulary logits [B, T, V] at the text positions: text-only (stage 2) or fused with images."""
    if images is None:
      x = self.text_tokens(tokens, train)
    else:
      x = self.fused_tokens(images, tokens, train)[:, : tokens.shape[1]]
    return self.mlm_head(x)

  def mim_logits(self, images: jax.Array, patch_mask: jax.Array, train: bool = False) -> jax.Array:
    """Codebook logits [B, N, K] at every patch of the image encoder run on masked patches."""
    if not self.codebook_size:
      raise ValueError("masked image modelling needs model.codebook_size (the tokenizer's codebook size)")
    return self.mim_head(self.image_tokens(images, patch_mask, train)[:, 1:])

  def vqa_logits(self, images: jax.Array, questions: jax.Array, train: bool = False) -> jax.Array:
    """Answer logits [B, num_answers] of the fusion encoder on [question; image]."""
    if not self.num_answers:
      raise ValueError("VQA needs model.num_answers (the size of data.answer_vocab)")
    x = self.vqa_norm(self.vqa_dense(self.pooled(images, questions, train)))
    return self.vqa_head(get_activation("gelu")(x))

  def image_codes(self, images: jax.Array) -> jax.Array:
    """The frozen tokenizer's codes [B, N] (row-major patch order), no gradient."""
    if self.tokenizer is None:
      raise ValueError("masked image modelling needs model.tokenizer (the VQTokenizer kwargs)")
    codes = self.image_tokenizer.encode(images)
    if codes.shape[1:] != (self.grid, self.grid):
      raise ValueError(
        f"tokenizer grid {codes.shape[1:]} differs from the model's patch grid "
        f"{(self.grid, self.grid)}: model.tokenizer.patch_size must equal model.patch_size"
      )
    return jax.lax.stop_gradient(codes.reshape(codes.shape[0], -1))

  def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False):
    """(z_img, z_txt, out) like TwoTower; also runs every head so that init creates all parameters.

    out: 'scale', 'bias', 'itm' [B, 2], 'mlm' [B, T, V] (fused), 'mim' [B, N, K] and 'vqa' [B, A]
    where configured.
    """
    zimg, _ = self.encode_image(images, train)
    ztxt, _ = self.encode_text(tokens, train)
    out: dict[str, Any] = {"itm": self.itm_logits(images, tokens, train), "mlm": self.mlm_logits(tokens, images, train)}
    out["mlm_text"] = self.mlm_logits(tokens, None, train)
    if self.codebook_size:
      out["mim"] = self.mim_logits(images, jnp.zeros((images.shape[0], self.grid**2), bool), train)
    if self.num_answers:
      out["vqa"] = self.vqa_logits(images, tokens, train)
    if self.tokenizer is not None:
      out["codes"] = self.image_codes(images)
    out["scale"], out["bias"] = self.scale_and_bias()
    return zimg, ztxt, out


def predict_fns(model: VLMo) -> dict[str, Any]:
  """The contrastive predict functions (two_tower.predict_fns) and vqa_logits(params, images,
  questions [B, L]) -> answer logits [B, num_answers] (VQA as answer classification)."""
  vqa = lambda params, images, questions: model.apply(  # noqa: E731
    {"params": params}, images, questions, method=VLMo.vqa_logits
  )
  return dict(two_tower.predict_fns(model), vqa_logits=vqa)
