"""The BLIP-2 Querying Transformer (Q-Former; Li et al. 2023, "BLIP-2", sec. 3.1-3.2).

A BERT-style (post-LayerNorm) transformer over the sequence [queries (Q); text (T)]:

    x = LN([query_embeds; word(tokens) + pos(0..T-1)])                       'norm'
    every layer i:
      x = LN(x + SelfAttn(x, mask(mode)))                                    'attn', 'norm_attn'
      q = x[:, :Q]; t = x[:, Q:]
      q = LN(q + CrossAttn(q, image))  if i % cross_attention_frequency == 0 'cross_attn', 'norm_cross'
      q = LN(q + MLP_query(q));  t = LN(t + MLP_text(t))                     'mlp_query', 'mlp_text', ...
      x = [q; t]

The learned queries are *not* parameters of this module (HF keeps `query_tokens` outside
`Blip2QFormerModel` too): the owner passes them in as `query_embeds` [B, Q, D]. Cross-attention
to the (frozen) image features reaches the query positions only, in every
`cross_attention_frequency`-th layer (BLIP-2: every other one, from layer 0). Queries and text
have separate feed-forward blocks (HF `intermediate_query`/`output_query` and
`intermediate`/`output`).

The self-attention mask selects the stage-1 objective (BLIP-2 fig. 2, right):

  'unimodal'          queries see queries, text sees text (ITC; a text-only call is the text encoder)
  'bidirectional'     every position sees every position (ITM)
  'multimodal_causal' queries see queries only; text sees all queries and the text up to itself (ITG)

Padded text positions (tokens == pad_id, or `text_mask` False) are never attended to. Because in
every mode the queries never see the text, the query outputs of a call with text equal those of a
call without it (except in 'bidirectional'): that is what the stage-2 connector consumes.

`vocab_size=None` gives the queries-only Q-Former of BLIP-2 stage 2 / HF
`Blip2ForConditionalGeneration` (no word or position embeddings, no text feed-forward blocks).

Parameter layout (`block_{i}/...`) and HF names: vlm.convert.blip2.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.nn.attention import MultiHeadAttention, make_attention_mask
from vlm.nn.mlp import Mlp
from vlm.nn.norms import make_norm
from vlm.nn.posemb import LearnedPosEmb
from vlm.nn.transformer import REMAT_POLICIES

Dtype = Any
MODES = ("unimodal", "bidirectional", "multimodal_causal")


def qformer_attention_mask(
  num_query: int, text_valid: jax.Array | None, mode: str, num_text: int | None = None
) -> jax.Array:
  """The Q-Former self-attention mask [B or 1, 1, Q + T, Q + T], True = may attend.

  text_valid [B, T] bool (None: every text position valid; then num_text gives T).
  """
  if mode not in MODES:
    raise ValueError(f"Q-Former attention mode {mode!r}; known: {MODES}")
  t = text_valid.shape[1] if text_valid is not None else int(num_text or 0)
  n = num_query + t
  is_q = jnp.arange(n) < num_query
  pos = jnp.arange(n)
  if mode == "unimodal":
    allowed = is_q[:, None] == is_q[None, :]
  elif mode == "bidirectional":
    allowed = jnp.ones((n, n), bool)
  else:  # multimodal_causal: keys that are queries, or earlier-or-same text for text rows
    allowed = is_q[None, :] | (~is_q[:, None] & (pos[None, :] <= pos[:, None]))
  allowed = allowed[None, None]  # [1, 1, L, L]
  if text_valid is not None:
    key_valid = jnp.concatenate([jnp.ones((text_valid.shape[0], num_query), bool), text_valid.astype(bool)], axis=1)
    allowed = allowed & key_valid[:, None, None, :]
  return allowed


class QFormerLayer(nn.Module):
  """One post-LN Q-Former layer: [B, Q + T, D] -> [B, Q + T, D] (see the module docstring).

  cross_attention: this layer attends from the queries to the image features.
  text: this layer has the text feed-forward block (`mlp_text`); without it, T must be 0.
  """

  num_heads: int
  mlp_dim: int
  cross_attention: bool = False
  text: bool = True
  mlp_act: str = "gelu"
  norm_eps: float = 1e-12
  dropout: float = 0.0
  dtype: Dtype = None

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    image: jax.Array | None,
    mask: jax.Array | None,
    image_mask: jax.Array | None,
    num_query: int,
    deterministic: bool = True,
  ) -> jax.Array:
    """x [B, Q + T, D]; image [B, N, Dv] (needed when this layer cross-attends and Q > 0);
    mask [B or 1, 1, Q+T, Q+T] bool; image_mask [B, N] bool or None; num_query Q (static)."""
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
    drop = nn.Dropout(self.dropout)

    def attn(name):
      return MultiHeadAttention(num_heads=self.num_heads, use_bias=True, dtype=self.dtype, name=name)

    def norm(name):
      return make_norm("layer", self.norm_eps, self.dtype, name=name)

    def ffn(h, name):
      y = Mlp(self.mlp_dim, act=self.mlp_act, dtype=self.dtype, name=f"mlp_{name}")(h)
      return norm(f"norm_mlp_{name}")(h + drop(y, deterministic))

    x = norm("norm_attn")(x + drop(attn("attn")(x, mask=mask), deterministic))
    q, t = x[:, :num_query], x[:, num_query:]
    outs = []
    if num_query:
      if self.cross_attention:
        if image is None:
          raise ValueError("Q-Former: the cross-attention layers need image features (image=None)")
        kv_mask = make_attention_mask(None, image_mask) if image_mask is not None else None
        q = norm("norm_cross")(q + drop(attn("cross_attn")(q, image, mask=kv_mask), deterministic))
      outs.append(ffn(q, "query"))
    if t.shape[1]:
      if not self.text:
        raise ValueError("Q-Former: got text positions but this Q-Former has no text side (vocab_size=None)")
      outs.append(ffn(t, "text"))
    x = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))


class QFormer(nn.Module):
  """Q-Former: (query_embeds [B, Q, D], tokens [B, T], image [B, N, Dv]) -> hidden states [B, Q + T, D].

  Defaults are BLIP-2's (BERT-base: 12 layers, width 768, 12 heads, MLP 3072, LN eps 1e-12,
  cross-attention every 2nd layer; BERT's vocabulary plus the [DEC] token; 512 positions).

  Attributes:
    cross_attention_frequency: layer i cross-attends iff i % frequency == 0 (HF convention).
    vocab_size: text vocabulary (None: queries-only Q-Former, no text side).
    max_len: learned text positions.
    pad_id: text padding id (keys at padded positions are masked).
    dropout: hidden dropout after the embedding LN, each attention output and each FFN output
      (BERT / BLIP-2: 0.1). Attention-probability dropout is not implemented.
    remat_policy: jax.checkpoint policy of each layer (vlm.nn.transformer.REMAT_POLICIES).
  """

  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  cross_attention_frequency: int = 2
  vocab_size: int | None = 30523
  max_len: int = 512
  pad_id: int = 0
  mlp_act: str = "gelu"
  norm_eps: float = 1e-12
  dropout: float = 0.0
  remat_policy: str = "none"
  dtype: Dtype = None

  def setup(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; known: {sorted(REMAT_POLICIES)}")
    if self.cross_attention_frequency < 1:
      raise ValueError(f"cross_attention_frequency must be >= 1, got {self.cross_attention_frequency}")
    init = nn.initializers.normal(0.02)
    if self.vocab_size:
      self.word_embed = nn.Embed(
        self.vocab_size,
        self.width,
        dtype=self.dtype,
        name="word_embed",
        embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
      )
      self.pos_embed = LearnedPosEmb(self.max_len, stddev=0.02, name="pos_embed")
    self.norm = make_norm("layer", self.norm_eps, self.dtype, name="norm")
    self.embed_dropout = nn.Dropout(self.dropout)
    layer = QFormerLayer
    if self.remat_policy != "none":
      layer = nn.remat(layer, policy=REMAT_POLICIES[self.remat_policy], static_argnums=(5, 6))
    self.layers = [
      layer(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        cross_attention=self.has_cross_attention(i),
        text=bool(self.vocab_size),
        mlp_act=self.mlp_act,
        norm_eps=self.norm_eps,
        dropout=self.dropout,
        dtype=self.dtype,
        name=f"block_{i}",
      )
      for i in range(self.depth)
    ]

  def has_cross_attention(self, i: int) -> bool:
    """Whether layer i cross-attends to the image (HF: layer_idx % cross_attention_frequency == 0)."""
    return i % self.cross_attention_frequency == 0

  def embed_text(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> word + learned position embeddings [B, T, D] (before the shared LN)."""
    if not self.vocab_size:
      raise ValueError("Q-Former: text input needs vocab_size (this is a queries-only Q-Former)")
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"Q-Former: text length {tokens.shape[1]} exceeds max_len {self.max_len}")
    return self.pos_embed(self.word_embed(tokens))

  def attend(self, x: jax.Array) -> jax.Array:
    """x [..., D] @ word_embeddings.T -> [..., V] (a tied LM head's decoder)."""
    return self.word_embed.attend(x)

  def __call__(
    self,
    query_embeds: jax.Array | None,
    tokens: jax.Array | None = None,
    image: jax.Array | None = None,
    *,
    mode: str = "unimodal",
    text_mask: jax.Array | None = None,
    image_mask: jax.Array | None = None,
    train: bool = False,
  ) -> jax.Array:
    """Hidden states [B, Q + T, D]: the Q query outputs, then the T text outputs.

    query_embeds [B, Q, D] (or None: text only, Q = 0); tokens [B, T] int (or None: queries only);
    image [B, N, Dv] features for the cross-attention (needed when Q > 0); mode: 'unimodal',
    'bidirectional' or 'multimodal_causal' (module docstring); text_mask [B, T] bool (default
    tokens != pad_id); image_mask [B, N] bool (default: every feature valid).
    """
    if query_embeds is None and tokens is None:
      raise ValueError("Q-Former: give query_embeds, tokens or both")
    parts = []
    num_query = 0
    if query_embeds is not None:
      num_query = query_embeds.shape[1]
      parts.append(jnp.asarray(query_embeds, self.dtype or jnp.float32))
    text_valid = None
    if tokens is not None:
      txt = self.embed_text(tokens)
      parts.append(txt.astype(parts[0].dtype) if parts else txt)
      text_valid = (tokens != self.pad_id) if text_mask is None else text_mask.astype(bool)
    x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    x = self.embed_dropout(self.norm(x), not train)
    mask = qformer_attention_mask(num_query, text_valid, mode)
    if image is not None:
      image = jnp.asarray(image, x.dtype)
    for layer in self.layers:
      x = layer(x, image, mask, image_mask, num_query, not train)
    return x
