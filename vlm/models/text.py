"""Text transformer encoder (CLIP: causal, EOS pooling; SigLIP: bidirectional, last-token pooling)."""

from typing import Any

import flax.linen as nn
import jax

from vlm.models.vit import resolve_dims
from vlm.nn import Encoder, LearnedPosEmb, MAPHead, make_attention_mask, make_norm, pool
from vlm.nn.mlp import dense


class TextTransformer(nn.Module):
  """Token ids [B, L] -> (pooled embedding [B, out_dim or width], aux dict).

  pool_type: 'first', 'last', 'eos' (first position of eos_id), 'argmax' (largest id:
  OpenAI CLIP), 'gap', 'map'. causal=True gives CLIP's causal text encoder.
  padding_mask=True masks keys whose id is pad_id (CLIP's attention_mask); SigLIP was
  trained without one (fixed-length padding, last-token pooling).
  pool_mask_pad=True (the default) leaves tokens equal to pad_id out of 'gap' and 'map' pooling
  even without padding_mask; False pools over every position, pads included, as big_vision's text
  tower does (proj/image_text/text_transformer.py: x.mean(axis=1), MAPHead over all tokens), so
  imported big_vision towers pool as trained (vlm.convert.big_vision sets it). The other pool types
  never depend on pad_id: 'first'/'last' pick fixed positions, 'eos' the first eos_id, 'argmax' the
  largest id.
  aux: 'encoded' [B, L, width] after the final norm, 'pre_logits' [B, width].
  embed_norm=True adds BERT's LayerNorm 'embed_norm' on token + position embeddings (FLAVA's
  text encoder; fold a constant token-type embedding into pos_embedding). final_norm=False drops
  the final LayerNorm ('encoded' is then the last block's output; the owner normalises).
  """

  vocab_size: int
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  max_len: int = 64
  causal: bool = False
  pool_type: str = "last"
  eos_id: int | None = None
  pad_id: int = 0
  padding_mask: bool = False
  pool_mask_pad: bool = True
  out_dim: int | None = None
  head_bias: bool = True
  embed_norm: bool = False
  final_norm: bool = True
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
  def __call__(self, tokens: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    dims = self.dims()
    embed = nn.Embed(
      self.vocab_size,
      dims["width"],
      dtype=self.dtype,
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
      name="embedding",
    )
    x = embed(tokens)
    x = LearnedPosEmb(self.max_len, stddev=0.01, name="pos_embedding")(x)
    if self.embed_norm:
      x = make_norm("layer", self.norm_eps, self.dtype, name="embed_norm")(x)
    x = nn.Dropout(self.dropout)(x, not train)
    valid = tokens != self.pad_id
    mask = make_attention_mask(None, valid) if self.padding_mask else None
    x = Encoder(
      depth=dims["depth"],
      num_heads=dims["num_heads"],
      mlp_dim=dims["mlp_dim"],
      mlp_act=self.mlp_act,
      norm_eps=self.norm_eps,
      dropout=self.dropout,
      droppath=self.droppath,
      causal=self.causal,
      scan=self.scan,
      remat_policy=self.remat_policy,
      dtype=self.dtype,
      name="encoder",
    )(x, mask=mask, deterministic=not train)
    if self.final_norm:
      x = make_norm("layer", self.norm_eps, self.dtype, name="encoder_norm")(x)
    aux = {"encoded": x}
    pool_mask = valid if self.pool_mask_pad else None
    if self.pool_type == "map":
      x = MAPHead(
        num_heads=dims["num_heads"],
        mlp_dim=dims["mlp_dim"],
        mlp_act=self.mlp_act,
        norm_eps=self.norm_eps,
        dtype=self.dtype,
        name="MAPHead",
      )(x, mask=pool_mask)
    else:
      x = pool(x, self.pool_type, tokens=tokens, eos_id=self.eos_id, mask=pool_mask)
    aux["pre_logits"] = x
    if self.out_dim is not None:
      x = dense(self.out_dim, ("embed", "proj"), use_bias=self.head_bias, dtype=self.dtype, name="head")(x)
    return x, aux
