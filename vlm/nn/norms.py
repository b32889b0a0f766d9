"""LayerNorm and RMSNorm with logically-named parameters."""

from typing import Any

import flax.linen as nn


def make_norm(kind: str = "layer", eps: float = 1e-6, dtype: Any = None, name: str | None = None) -> nn.Module:
  """Returns a LayerNorm ('layer') or RMSNorm ('rms') over the last axis.

  Parameters are float32, named `scale` (and `bias` for LayerNorm), logical axis 'norm'.
  """
  scale_init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
  if kind == "layer":
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("norm",))
    return nn.LayerNorm(epsilon=eps, dtype=dtype, scale_init=scale_init, bias_init=bias_init, name=name)
  if kind == "rms":
    return nn.RMSNorm(epsilon=eps, dtype=dtype, scale_init=scale_init, name=name)
  raise ValueError(f"norm kind must be 'layer' or 'rms', got {kind!r}")
