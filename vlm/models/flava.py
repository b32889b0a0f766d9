"""FLAVA (Singh et al. 2022, "FLAVA: A Foundational Language And Vision Alignment Model").

Three transformers and a set of heads (sec. 3.1, Fig. 2):

    images -> ViT (class token; masked patches -> learned mask token)   -> h_I [B, 1 + N, Wi]
    text [BOS w1 .. EOS pad ..] -> bidirectional text encoder (BOS = [CLS_T]) -> h_T [B, L, Wt]
    [cls_M; proj_I(h_I); proj_T(h_T)] -> multimodal encoder (6 layers in base)  -> h_M [B, 1 + 1 + N + L, Wm]

    contrastive:  z_I = l2(W_I h_I[:, 0]),  z_T = l2(W_T h_T[:, 0]), softmax temperature (as CLIP)
    MIM head  on h_I[:, 1:]          -> visual codebook logits [B, N, K]
    MLM head  on h_T                 -> text vocabulary logits [B, L, V]
    MMM heads on h_M's image / text positions -> [B, N, K] and [B, L, V]
    ITM head  on h_M[:, 0] (dense + tanh pooler, then 2 logits: no match / match)

The MIM targets are the codes of a frozen discrete image tokenizer (FLAVA uses DALL-E's dVAE,
8192 codes; here vlm.models.vq.VQTokenizer) held as the submodule `tokenizer`, one code per ViT
patch. Its parameters live under 'tokenizer/' and load from a VQ workdir with
`init.mapping={'tokenizer/': ''}`; keep them fixed with `frozen=['tokenizer/.*']` (the codes are
stop-gradient'ed in any case). Only the tokenizer's encoder and codebook are part of this model.

The text encoder takes BOS as its [CLS] position (data.add_bos=True); keys at padding are masked
in the text and the multimodal encoders (BERT's attention mask). The multimodal encoder adds no
position embeddings: the unimodal states carry them.

encode_image / encode_text have the TwoTower signatures, so the zero-shot and retrieval
evaluations apply unchanged. __call__ runs every head once (and so creates every parameter);
vlm.objectives.flava composes the methods below into the pretraining losses.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.models.text import TextTransformer
from vlm.models.two_tower import CLIP_TEMPERATURE_INIT, LearnedScaleAndBias, l2_normalize
from vlm.models.vit import ViT, resolve_dims
from vlm.models.vq import VQTokenizer
from vlm.nn import Encoder, MaskedPredictionHead, make_attention_mask, make_norm
from vlm.nn.mlp import dense


class MaskedViT(ViT):
  """ViT with BEiT's learned mask token (Bao et al. 2022, sec. 2.2), FLAVA's image encoder for MIM and MMM.

  Adds the parameter 'mask_token' [1, 1, width]; a call with patch_mask [B, gh * gw] bool (row-major
  patches) replaces the embeddings of the masked patches by it before the class token and the position
  embeddings are added, so masked pixels never reach the encoder. Without a patch_mask its outputs are
  those of the plain ViT with the same parameters.
  """

  def mask_patches(self, x: jax.Array, patch_mask: jax.Array | None) -> jax.Array:
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed"))
    token = self.param("mask_token", init, (1, 1, x.shape[-1]))
    if patch_mask is None:
      return x
    return jnp.where(patch_mask[..., None], token.astype(x.dtype), x)


class ITMHead(nn.Module):
  """Image-text matching: pooler (dense + tanh on the multimodal CLS state) -> 2 logits, [B, W] -> [B, 2]."""

  dtype: Any = None

  @nn.compact
  def __call__(self, cls_state: jax.Array) -> jax.Array:
    x = jnp.tanh(
      dense(cls_state.shape[-1], ("embed", "mlp"), use_bias=True, dtype=self.dtype, name="pooler")(cls_state)
    )
    return dense(2, ("mlp", None), use_bias=True, dtype=self.dtype, name="classifier")(x)


class MultimodalEncoder(nn.Module):
  """[cls_M; x] -> bidirectional encoder -> LayerNorm: x [B, T, W] (valid [B, T] bool) -> [B, 1 + T, W].

  Sizes from `variant` (e.g. 'B') overridden by the explicit fields; FLAVA-base uses a 6-layer
  ViT-B-sized encoder (sec. 3.1), so set depth=6 with variant 'B'.
  """

  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  mlp_act: str = "gelu"
  norm_eps: float = 1e-6
  dropout: float = 0.0
  droppath: float = 0.0
  scan: bool = False
  remat_policy: str = "none"
  dtype: Any = None

  def dims(self) -> dict[str, Any]:
    return resolve_dims(self, ("width", "depth", "mlp_dim", "num_heads"))

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array, train: bool = False) -> jax.Array:
    d = self.dims()
    b = x.shape[0]
    cls = self.param(
      "cls", nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")), (1, 1, d["width"])
    )
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d["width"])).astype(x.dtype), x], axis=1)
    mask = make_attention_mask(None, jnp.concatenate([jnp.ones((b, 1), bool), valid.astype(bool)], axis=1))
    x = nn.Dropout(self.dropout)(x, not train)
    x = Encoder(
      depth=d["depth"],
      num_heads=d["num_heads"],
      mlp_dim=d["mlp_dim"],
      mlp_act=self.mlp_act,
      norm_eps=self.norm_eps,
      dropout=self.dropout,
      droppath=self.droppath,
      scan=self.scan,
      remat_policy=self.remat_policy,
      dtype=self.dtype,
      name="encoder",
    )(x, mask=mask, deterministic=not train)
    return make_norm("layer", self.norm_eps, self.dtype, name="encoder_norm")(x)


class FLAVA(LearnedScaleAndBias, nn.Module):
  """FLAVA's encoders and heads.

  image: MaskedViT kwargs (class_token, pool_type 'cls' and no head are forced).
  text: TextTransformer kwargs incl. vocab_size (include the [MASK] row: the embedded dataset's
    1000 pieces + 1); pool_type 'first' (BOS as [CLS]) and padding_mask=True by default, always
    bidirectional, no head.
  multimodal: MultimodalEncoder kwargs.
  tokenizer: VQTokenizer kwargs (None: no MIM / MMM-image heads, no codes).
  embed_dim: contrastive embedding size E.
  temperature_init / bias_init / max_scale: the LearnedScaleAndBias fields (CLIP's by default:
    FLAVA's contrastive loss follows CLIP, sec. 3.3).
  fuse_prenorm: False (default): the multimodal encoder takes the unimodal states after their
    towers' final LayerNorms. True: as transformers' FlavaModel (`image_to_mm_projection(
    image_states[-1])`, the last block's output), it takes them before; the towers then have no
    final norm of their own (final_norm=False) and FLAVA holds it as 'img_norm' / 'txt_norm',
    applied by the contrastive embeddings, MLM / MIM heads and encode_*. image_states /
    text_states then return the un-normalised states; image_normed / text_normed normalise them.
    vlm.convert.import_hf sets it for FLAVA checkpoints.

  __call__(images [B,H,W,3], tokens [B,L], patch_mask [B,N] | None, masked_tokens [B,L] | None)
  -> (z_img [B,E], z_txt [B,E], out) with out['scale'], out['bias'] and the heads' logits on the
  masked inputs (the unmasked ones where no mask is given): 'mlm_logits' [B,L,V], 'mim_logits'
  [B,N,K], 'mmm_text_logits', 'mmm_image_logits', 'itm_logits' [B,2], and 'codes' [B,N].
  """

  image: dict | None = None
  text: dict | None = None
  multimodal: dict | None = None
  tokenizer: dict | None = None
  embed_dim: int = 768
  temperature_init: float = CLIP_TEMPERATURE_INIT
  bias_init: float | None = None
  max_scale: float | None = 100.0
  fuse_prenorm: bool = False
  dtype: Any = None  # compute dtype of the three encoders and the tokenizer (their own `dtype` keys win)

  def image_kwargs(self) -> dict:
    kw = dict({"dtype": self.dtype, **(self.image or {})}, class_token=True, pool_type="cls", out_dim=None)
    return dict(kw, final_norm=False) if self.fuse_prenorm else kw

  def text_kwargs(self) -> dict:
    kw = dict(pool_type="first", padding_mask=True, dtype=self.dtype)
    kw.update(self.text or {})
    if "vocab_size" not in kw:
      raise ValueError("FLAVA needs text=dict(vocab_size=..., ...) (the tokenizer's pieces + 1 for [MASK])")
    kw = dict(kw, causal=False, out_dim=None)
    return dict(kw, final_norm=False) if self.fuse_prenorm else kw

  def text_vocab_size(self) -> int:
    """Rows of the text embedding (and MLM logits); usable on an unbound module."""
    return int(self.text_kwargs()["vocab_size"])

  def setup(self):
    self.img = MaskedViT(**self.image_kwargs())
    self.txt = TextTransformer(**self.text_kwargs())
    if self.fuse_prenorm:
      ik, tk = self.image_kwargs(), self.text_kwargs()
      self.img_norm = make_norm("layer", ik.get("norm_eps", 1e-6), ik.get("dtype"), name="img_norm")
      self.txt_norm = make_norm("layer", tk.get("norm_eps", 1e-6), tk.get("dtype"), name="txt_norm")
    self.mm = MultimodalEncoder(**{"dtype": self.dtype, **(self.multimodal or {})})
    width = self.mm.dims()["width"]
    self.image_to_mm = dense(width, ("embed", "mlp"), use_bias=True, dtype=None, name="image_to_mm")
    self.text_to_mm = dense(width, ("embed", "mlp"), use_bias=True, dtype=None, name="text_to_mm")
    self.img_proj = dense(self.embed_dim, ("embed", "proj"), use_bias=True, dtype=None, name="img_proj")
    self.txt_proj = dense(self.embed_dim, ("embed", "proj"), use_bias=True, dtype=None, name="txt_proj")
    vocab = self.text_vocab_size()
    self.mlm_head = MaskedPredictionHead(vocab)
    self.mmm_text_head = MaskedPredictionHead(vocab)
    self.itm_head = ITMHead()
    if self.tokenizer is not None:
      self.tokenizer_module = VQTokenizer(**self.tokenizer, name="tokenizer")
      codes = self.tokenizer_module.codebook_size
      self.mim_head = MaskedPredictionHead(codes)
      self.mmm_image_head = MaskedPredictionHead(codes)
    self.setup_scale_and_bias()

  # --- unimodal encoders ---------------------------------------------------------------------

  def patch_grid(self, images: jax.Array) -> tuple[int, int]:
    """The image encoder's patch grid (gh, gw) for images [B, H, W, 3]."""
    p = self.img.dims()["patch_size"]
    return images.shape[1] // p[0], images.shape[2] // p[1]

  def image_states(self, images: jax.Array, patch_mask: jax.Array | None = None, train: bool = False) -> jax.Array:
    """h_I [B, 1 + N, Wi] after the final norm (before it with fuse_prenorm); patch_mask [B, N] bool puts the
    mask token at masked patches."""
    return self.img(images, train=train, patch_mask=patch_mask)[1]["encoded"]

  def text_states(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    """h_T [B, L, Wt] after the final norm (before it with fuse_prenorm); position 0, BOS, is [CLS_T]."""
    return self.txt(tokens, train=train)[1]["encoded"]

  def image_normed(self, h_img: jax.Array) -> jax.Array:
    """image_states' output after the image tower's final norm (the identity unless fuse_prenorm)."""
    return self.img_norm(h_img) if self.fuse_prenorm else h_img

  def text_normed(self, h_txt: jax.Array) -> jax.Array:
    """text_states' output after the text tower's final norm (the identity unless fuse_prenorm)."""
    return self.txt_norm(h_txt) if self.fuse_prenorm else h_txt

  def text_valid(self, tokens: jax.Array) -> jax.Array:
    return tokens != self.txt.pad_id

  def embed_image_states(self, h_img: jax.Array) -> jax.Array:
    """Contrastive image embedding, l2-normalised [B, E], from [CLS_I]."""
    return l2_normalize(self.img_proj(self.image_normed(h_img[:, 0])).astype(jnp.float32))

  def embed_text_states(self, h_txt: jax.Array) -> jax.Array:
    """Contrastive text embedding, l2-normalised [B, E], from [CLS_T]."""
    return l2_normalize(self.txt_proj(self.text_normed(h_txt[:, 0])).astype(jnp.float32))

  def encode_image(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    h = self.image_states(images, train=train)
    return self.embed_image_states(h), {"encoded": self.image_normed(h)}

  def encode_text(self, tokens: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    h = self.text_states(tokens, train)
    return self.embed_text_states(h), {"encoded": self.text_normed(h)}

  # --- tokenizer -----------------------------------------------------------------------------

  def image_codes(self, images: jax.Array) -> jax.Array:
    """The frozen tokenizer's codes, int32 [B, N] in the ViT's row-major patch order (no gradient)."""
    if self.tokenizer is None:
      raise ValueError("FLAVA has no tokenizer (model.tokenizer=None): MIM and MMM-image need one")
    codes = self.tokenizer_module.encode(images)
    grid = self.patch_grid(images)
    if tuple(codes.shape[1:]) != tuple(grid):
      raise ValueError(
        f"the tokenizer's code grid {tuple(codes.shape[1:])} (patch_size {self.tokenizer_module.patch_size}) "
        f"differs from the image encoder's patch grid {tuple(grid)} (patch_size {self.img.dims()['patch_size']}) "
        f"for images of size {tuple(images.shape[1:3])}: MIM needs one code per ViT patch"
      )
    return jax.lax.stop_gradient(codes.reshape(codes.shape[0], -1))

  # --- multimodal encoder and heads ----------------------------------------------------------

  def fuse(self, h_img: jax.Array, h_txt: jax.Array, text_valid: jax.Array, train: bool = False) -> jax.Array:
    """h_M [B, 1 + (1 + N) + L, Wm] over [cls_M; proj(h_I); proj(h_T)] (image_states / text_states' outputs);
    padding keys masked."""
    x = jnp.concatenate([self.image_to_mm(h_img), self.text_to_mm(h_txt)], axis=1)
    valid = jnp.concatenate([jnp.ones(h_img.shape[:2], bool), text_valid], axis=1)
    return self.mm(x, valid, train)

  def mlm_logits(self, h_txt: jax.Array) -> jax.Array:
    return self.mlm_head(self.text_normed(h_txt))

  def mim_logits(self, h_img: jax.Array) -> jax.Array:
    """Codebook logits [B, N, K] at the patches (the class token dropped)."""
    return self.mim_head(self.image_normed(h_img[:, 1:]))

  def mmm_text_logits(self, h_mm: jax.Array, text_len: int) -> jax.Array:
    return self.mmm_text_head(h_mm[:, h_mm.shape[1] - text_len :])

  def mmm_image_logits(self, h_mm: jax.Array, num_patches: int) -> jax.Array:
    """Codebook logits [B, N, K] at h_M's patch positions (after cls_M and [CLS_I])."""
    return self.mmm_image_head(h_mm[:, 2 : 2 + num_patches])

  def itm_logits(self, h_mm: jax.Array) -> jax.Array:
    return self.itm_head(h_mm[:, 0])

  def __call__(
    self,
    images: jax.Array,
    tokens: jax.Array,
    patch_mask: jax.Array | None = None,
    masked_tokens: jax.Array | None = None,
    train: bool = False,
  ):
    codes = self.image_codes(images) if self.tokenizer is not None else None  # first: a grid mismatch fails fast
    h_img = self.image_states(images, train=train)
    h_txt = self.text_states(tokens, train)
    zimg, ztxt = self.embed_image_states(h_img), self.embed_text_states(h_txt)
    hm_img = self.image_states(images, patch_mask, train) if patch_mask is not None else h_img
    hm_txt = self.text_states(masked_tokens, train) if masked_tokens is not None else h_txt
    h_mm = self.fuse(hm_img, hm_txt, self.text_valid(tokens), train)
    out: dict[str, Any] = {
      "mlm_logits": self.mlm_logits(hm_txt),
      "itm_logits": self.itm_logits(h_mm),
      "mmm_text_logits": self.mmm_text_logits(h_mm, tokens.shape[1]),
    }
    if self.tokenizer is not None:
      out["codes"] = codes
      out["mim_logits"] = self.mim_logits(hm_img)
      out["mmm_image_logits"] = self.mmm_image_logits(h_mm, hm_img.shape[1] - 1)
    out["scale"], out["bias"] = self.scale_and_bias()
    return zimg, ztxt, out
