"""Building blocks shared by every model family (Flax linen, logical axis names on every parameter)."""

from vlm.nn.attention import MultiHeadAttention, make_attention_mask
from vlm.nn.heads import MaskedPredictionHead
from vlm.nn.mlp import Mlp
from vlm.nn.norms import make_norm
from vlm.nn.patch import PatchEmbed
from vlm.nn.poolers import AttentionalPooler, MAPHead, concat_adjacent_tokens, pool
from vlm.nn.posemb import LearnedPosEmb, resample_posemb, sincos2d
from vlm.nn.transformer import Block, Decoder, Encoder, Stack, decoder_block, encoder_block, lm_block

__all__ = [
  "AttentionalPooler",
  "concat_adjacent_tokens",
  "Block",
  "Decoder",
  "Encoder",
  "LearnedPosEmb",
  "MAPHead",
  "MaskedPredictionHead",
  "Mlp",
  "MultiHeadAttention",
  "PatchEmbed",
  "Stack",
  "decoder_block",
  "encoder_block",
  "lm_block",
  "make_attention_mask",
  "make_norm",
  "pool",
  "resample_posemb",
  "sincos2d",
]
