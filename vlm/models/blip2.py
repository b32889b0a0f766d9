"""BLIP-2 stage 1: vision-language representation learning with a frozen image encoder
(Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and
Large Language Models", sec. 3.2).

    images -> ViT (frozen in stage 1) -> LN'd features [B, N, Dv]                       'img'
    learned queries [1, Q, D]                                                            'query_tokens'
    Q-Former (vlm.nn.qformer) over [queries; text], cross-attending to the features     'qformer'

    ITC  queries alone ('unimodal')  -> vision_proj -> L2 -> z_img [B, Q, E]
         text alone ('unimodal')     -> CLS state -> text_proj -> L2 -> z_txt [B, E]
         sim(i, t) = max_q <z_img[i, q], z_txt[t]>                                        (sec. 3.2)
    ITM  [queries; text] 'bidirectional' -> itm_head on each query output -> mean over Q -> [B, 2]
    ITG  [queries; [DEC] w1 ..] 'multimodal_causal' -> BERT LM head (decoder tied to the word
         embeddings) -> [B, T, V], position t predicting token t + 1

`query_features(images)` [B, Q, D] (the raw query outputs) is what stage 2 projects into the LLM.
In 'unimodal' and 'multimodal_causal' the queries never see the text, so the ITC image embeddings
and the ITG logits come from one pass (`encode_image_and_itg`).

Sizes default to the paper: EVA-CLIP ViT-g/14 at 224 px without its last layer (39 of 40 blocks,
the features after a LayerNorm: HF Blip2VisionModel's post_layernorm, LAVIS' ln_vision); 32 queries;
BERT-base Q-Former (vocabulary 30522 + [DEC]) with cross-attention every other layer; E = 256.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.models.two_tower import LearnedScaleAndBias, l2_normalize
from vlm.models.vit import ViT
from vlm.nn.mlp import dense, get_activation
from vlm.nn.norms import make_norm
from vlm.nn.qformer import QFormer

BLIP2_TEMPERATURE_INIT = math.log(1 / 0.07)  # LAVIS: temp = 0.07, learned, clamped to [0.001, 0.5]

# EVA-CLIP ViT-g/14 without its last block, as BLIP-2 uses it (HF Blip2VisionConfig defaults).
EVA_VIT_G = dict(
  variant="g/14",
  depth=39,
  class_token=True,
  pool_type="none",
  posemb="learn",
  posemb_grid=(16, 16),
  patch_bias=True,
  norm_eps=1e-6,
  mlp_act="gelu",
)
# BERT-base Q-Former (HF Blip2QFormerConfig defaults; [DEC] = 30522 appended to BERT's vocabulary).
BERT_BASE_QFORMER = dict(
  width=768,
  depth=12,
  num_heads=12,
  mlp_dim=3072,
  cross_attention_frequency=2,
  vocab_size=30523,
  max_len=512,
  norm_eps=1e-12,
  dropout=0.1,
)


class Blip2QFormer(LearnedScaleAndBias, nn.Module):
  """The BLIP-2 stage-1 model (ViT + queries + Q-Former + ITC/ITM/ITG heads).

  Attributes:
    image: ViT kwargs (vlm.models.vit; pool_type 'none': every token of the final-norm output is a
      feature, the class token included, as HF feeds Blip2VisionModel.last_hidden_state).
    qformer: QFormer kwargs (vlm.nn.qformer).
    num_query_tokens: Q (BLIP-2: 32).
    embed_dim: E of the ITC embeddings (BLIP-2: 256).
    freeze_image: the image features are stop-gradient'ed and the ViT runs in inference mode (the
      paper's frozen encoder; pair with the optimiser's `frozen = ['img/.*']` so it gets no update).
    dec_id: the [DEC] token that replaces the first text token (BOS / [CLS]) for ITG (LAVIS: BERT's
      vocabulary + [DEC] = 30522). Must be < qformer vocab_size.
    tie_lm_head: the ITG decoder is the transposed word embedding (BERT) plus a bias; else a dense.
  """

  image: dict | None = None
  qformer: dict | None = None
  num_query_tokens: int = 32
  embed_dim: int = 256
  freeze_image: bool = True
  dec_id: int = 30522
  tie_lm_head: bool = True
  temperature_init: float = BLIP2_TEMPERATURE_INIT
  bias_init: float | None = None
  max_scale: float | None = 1000.0  # LAVIS clamps the temperature at 0.001
  dtype: Any = None

  def setup(self):
    self.img = ViT(**{"dtype": self.dtype, **(self.image if self.image is not None else EVA_VIT_G)}, name="img")
    qf = dict(BERT_BASE_QFORMER if self.qformer is None else self.qformer)
    # qformer.vocab_size None: the queries-only Q-Former of BLIP-2 stage 2 (HF
    # Blip2ForConditionalGeneration): query_features only, no text side, heads or temperature.
    text = qf.get("vocab_size") is not None
    if text and not 0 <= self.dec_id < qf["vocab_size"]:
      raise ValueError(f"dec_id={self.dec_id} is not a row of the Q-Former's vocabulary ({qf['vocab_size']})")
    qf.setdefault("dtype", self.dtype)
    self.qformer_module = QFormer(**qf, name="qformer")
    width = self.qformer_module.width
    self.query_tokens = self.param(
      "query_tokens",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
      (1, self.num_query_tokens, width),
    )
    if not text:
      return
    self.vision_proj = dense(self.embed_dim, ("embed", "proj"), use_bias=True, dtype=self.dtype, name="vision_proj")
    self.text_proj = dense(self.embed_dim, ("embed", "proj"), use_bias=True, dtype=self.dtype, name="text_proj")
    self.itm_head = dense(2, ("embed", None), use_bias=True, dtype=self.dtype, name="itm_head")
    # BERT's LM head (LAVIS BertOnlyMLMHead): dense -> GELU -> LN -> decoder (+ bias).
    self.lm_transform = dense(width, ("embed", "mlp"), use_bias=True, dtype=self.dtype, name="lm_transform")
    self.lm_norm = make_norm("layer", self.qformer_module.norm_eps, self.dtype, name="lm_norm")
    vocab = qf["vocab_size"]
    if self.tie_lm_head:
      self.lm_bias = self.param("lm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)), (vocab,))
    else:
      self.lm_decoder = dense(vocab, ("mlp", "vocab"), use_bias=True, dtype=self.dtype, name="lm_decoder")
    self.setup_scale_and_bias()

  # -- image side ---------------------------------------------------------------------------------

  def image_features(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images [B, H, W, 3] -> ViT features [B, N(+1), Dv] (after the ViT's final norm)."""
    _, aux = self.img(images, train=train and not self.freeze_image)
    feats = aux["encoded"]
    return jax.lax.stop_gradient(feats) if self.freeze_image else feats

  def queries(self, batch: int) -> jax.Array:
    """The learned queries broadcast to [B, Q, D]."""
    return jnp.broadcast_to(self.query_tokens, (batch,) + self.query_tokens.shape[1:])

  def _features(self, images, features, train):
    if features is None:
      if images is None:
        raise ValueError("Blip2QFormer: give images or their precomputed features")
      features = self.image_features(images, train)
    return features

  def query_features(
    self,
    images: jax.Array | None,
    train: bool = False,
    features: jax.Array | None = None,
    instruction: jax.Array | None = None,
  ) -> jax.Array:
    """Raw Q-Former query outputs [B, Q, D] (what stage 2 projects into the LLM).

    images [B, H, W, 3], or features [B, N, Dv] from `image_features`. instruction [B, L] tokens
    (Q-Former vocabulary, BOS first, pad_id padding), or None: with it, the queries and the
    instruction attend to each other (mode 'bidirectional') so the queries extract the features
    the instruction asks for: the question-conditioned Q-Former of BLIP-2's VQA fine-tuning
    (sec. 4.3) and InstructBLIP's instruction-aware Q-Former (Dai et al. 2023, sec. 2.2). Only
    the query outputs are returned.
    """
    feats = self._features(images, features, train)
    queries = self.queries(feats.shape[0])
    if instruction is None:
      return self.qformer_module(queries, None, feats, mode="unimodal", train=train)
    out = self.qformer_module(queries, instruction, feats, mode="bidirectional", train=train)
    return out[:, : queries.shape[1]]

  def embed_queries(self, query_out: jax.Array) -> jax.Array:
    """Query outputs [B, Q, D] -> L2-normalised ITC embeddings [B, Q, E]."""
    return l2_normalize(self.vision_proj(query_out).astype(jnp.float32))

  def encode_image(
    self, images: jax.Array | None, train: bool = False, features: jax.Array | None = None
  ) -> tuple[jax.Array, dict]:
    """ITC image embeddings [B, Q, E] (one per query, L2-normalised) and aux {'query_features'}."""
    q = self.query_features(images, train, features)
    return self.embed_queries(q), {"query_features": q}

  # -- text side ----------------------------------------------------------------------------------

  def encode_text(self, tokens: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    """ITC text embedding [B, E]: the Q-Former on the text alone, first ([CLS]/BOS) state, projected
    and L2-normalised; aux {'encoded': [B, T, D]}."""
    h = self.qformer_module(None, tokens, None, mode="unimodal", train=train)
    return l2_normalize(self.text_proj(h[:, 0]).astype(jnp.float32)), {"encoded": h}

  # -- multimodal heads ---------------------------------------------------------------------------

  def itm_logits(
    self, images: jax.Array | None, tokens: jax.Array, train: bool = False, features: jax.Array | None = None
  ) -> jax.Array:
    """Match / no-match logits [B, 2] (index 1: the pair matches): the ITM head on every query
    output of the bidirectional pass over [queries; text], averaged over the queries."""
    feats = self._features(images, features, train)
    q = self.num_query_tokens
    h = self.qformer_module(self.queries(feats.shape[0]), tokens, feats, mode="bidirectional", train=train)
    return jnp.mean(self.itm_head(h[:, :q]).astype(jnp.float32), axis=1)

  def lm_logits(self, h: jax.Array) -> jax.Array:
    """Text states [B, T, D] -> vocabulary logits [B, T, V] (BERT prediction head)."""
    x = self.lm_norm(get_activation("gelu")(self.lm_transform(h)))
    if self.tie_lm_head:
      return self.qformer_module.attend(x) + self.lm_bias.astype(x.dtype)
    return self.lm_decoder(x)

  def decoder_tokens(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] with the first token ([CLS]/BOS) replaced by [DEC] (dec_id)."""
    return tokens.at[:, 0].set(self.dec_id)

  def encode_image_and_itg(
    self, images: jax.Array | None, tokens: jax.Array, train: bool = False, features: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """One 'multimodal_causal' pass over [queries; [DEC] w1 ..]: (ITC image embeddings [B, Q, E],
    ITG logits [B, T, V]). The queries see only queries, so the first equals encode_image's."""
    feats = self._features(images, features, train)
    q = self.num_query_tokens
    h = self.qformer_module(
      self.queries(feats.shape[0]), self.decoder_tokens(tokens), feats, mode="multimodal_causal", train=train
    )
    return self.embed_queries(h[:, :q]), self.lm_logits(h[:, q:])

  def itg_logits(
    self, images: jax.Array | None, tokens: jax.Array, train: bool = False, features: jax.Array | None = None
  ) -> jax.Array:
    """ITG logits [B, T, V] for tokens [B, T] = [BOS/CLS, w1, ..] (the first becomes [DEC]);
    position t predicts token t + 1, seeing every query and the text up to t."""
    return self.encode_image_and_itg(images, tokens, train, features)[1]

  def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False):
    """(z_img [B, Q, E], z_txt [B, E], out) with out 'itm' [B, 2], 'itg' [B, T, V], 'scale', 'bias';
    runs every head so that init creates all parameters."""
    feats = self.image_features(images, train)
    zimg, itg = self.encode_image_and_itg(None, tokens, train, feats)
    ztxt, _ = self.encode_text(tokens, train)
    out: dict[str, Any] = {"itm": self.itm_logits(None, tokens, train, feats), "itg": itg}
    out["scale"], out["bias"] = self.scale_and_bias()
    return zimg, ztxt, out
