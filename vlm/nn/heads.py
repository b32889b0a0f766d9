"""Output heads shared by the masked-modelling families (BERT-style MLM, BEiT MIM, FLAVA, VLMo)."""

from typing import Any

import flax.linen as nn
import jax

from vlm.nn.mlp import dense, get_activation
from vlm.nn.norms import make_norm


class MaskedPredictionHead(nn.Module):
  """BERT's prediction head: dense -> GELU -> LayerNorm -> dense to `vocab_size` logits, [..., W] -> [..., V]."""

  vocab_size: int
  act: str = "gelu"
  norm_eps: float = 1e-6
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = dense(x.shape[-1], ("embed", "mlp"), use_bias=True, dtype=self.dtype, name="transform")(x)
    x = make_norm("layer", self.norm_eps, self.dtype, name="norm")(get_activation(self.act)(x))
    return dense(self.vocab_size, ("mlp", "vocab"), use_bias=True, dtype=self.dtype, name="decoder")(x)
