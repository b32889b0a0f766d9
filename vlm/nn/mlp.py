"""Transformer feed-forward blocks: GELU-family / squared-ReLU MLPs and gated (SwiGLU/GeGLU) MLPs."""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's sigmoid approximation of GELU."""
  return x * jax.nn.sigmoid(1.702 * x)


def relu2(x: jax.Array) -> jax.Array:
  """Squared ReLU, relu(x)^2 (So et al. 2021, Primer; Persimmon / Fuyu's MLP, HF "relu2")."""
  return jnp.square(jax.nn.relu(x))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact (erf), torch "gelu"
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # torch "gelu_pytorch_tanh"
  "quick_gelu": quick_gelu,
  "relu": jax.nn.relu,
  "relu2": relu2,
  "silu": jax.nn.silu,
}
GATED = {"swiglu": "silu", "geglu": "gelu_tanh"}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def dense(
  features: int,
  axes: tuple[str, str],
  *,
  use_bias: bool,
  dtype: Dtype,
  name: str,
  kernel_init: Callable = nn.initializers.xavier_uniform(),
  bias_init: Callable = nn.initializers.zeros,
) -> nn.Dense:
  """A Dense layer whose kernel/bias carry logical axis names (`axes` = (in, out))."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    kernel_init=nn.with_logical_partitioning(kernel_init, axes),
    bias_init=nn.with_logical_partitioning(bias_init, (axes[1],)),
    name=name,
  )


class Mlp(nn.Module):
  """Feed-forward block [..., D] -> [..., D or out_dim].

  act: 'gelu', 'gelu_tanh', 'quick_gelu', 'relu', 'relu2' (squared ReLU), 'silu' (fc1 -> act -> fc2), or gated
  'swiglu' / 'geglu' (act(wi_0 x) * wi_1 x -> wo; Shazeer 2020).
  """

  mlp_dim: int
  act: str = "gelu"
  out_dim: int | None = None
  use_bias: bool = True
  dropout: float = 0.0
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    d = self.out_dim or x.shape[-1]
    bias_init = nn.initializers.normal(stddev=1e-6)
    if self.act in GATED:
      act = get_activation(GATED[self.act])
      gate = dense(self.mlp_dim, ("embed", "mlp"), use_bias=self.use_bias, dtype=self.dtype, name="wi_0")(x)
      up = dense(self.mlp_dim, ("embed", "mlp"), use_bias=self.use_bias, dtype=self.dtype, name="wi_1")(x)
      h = act(gate) * up
      names = "wo"
    else:
      act = get_activation(self.act)
      h = act(
        dense(
          self.mlp_dim, ("embed", "mlp"), use_bias=self.use_bias, dtype=self.dtype, name="fc1", bias_init=bias_init
        )(x)
      )
      names = "fc2"
    h = nn.with_logical_constraint(h, ("act_batch", "act_len", "act_mlp")) if h.ndim == 3 else h
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    out = dense(d, ("mlp", "embed"), use_bias=self.use_bias, dtype=self.dtype, name=names, bias_init=bias_init)(h)
    return out
