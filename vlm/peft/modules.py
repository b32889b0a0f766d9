"""The PEFT computations on a layer: the bottleneck Adapter module and the LoRA update (one set, or
per-example sets) of a linear layer, with the parameters they create on it."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.nn.attention import HeadsDense
from vlm.peft.config import LORA_PARAMS

LINEAR_TYPES = (nn.Dense, nn.DenseGeneral, HeadsDense)  # the layers LoRA supports


class Adapter(nn.Module):
  """Houlsby bottleneck adapter on a block output: y + up(gelu(down(LN(y)))), up = 0 at init."""

  dim: int
  dtype: Any = None

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    d = y.shape[-1]
    h = nn.LayerNorm(
      epsilon=1e-6,
      dtype=self.dtype,
      name="norm",
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
    )(y)
    h = nn.Dense(
      self.dim,
      dtype=self.dtype,
      name="down",
      kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("embed", None)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
    )(h)
    h = nn.Dense(
      d,
      dtype=self.dtype,
      name="up",
      kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, (None, "embed")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )(nn.gelu(h))
    return y + h.astype(y.dtype)


def _linear_geometry(m: nn.Module, x: jax.Array) -> tuple[tuple[int, ...], int]:
  """(contracted input axes of x, number of output feature axes) of a supported linear layer."""
  if isinstance(m, HeadsDense):
    return tuple(range(x.ndim - m.in_dims, x.ndim)), len(m.features)
  if isinstance(m, nn.DenseGeneral):
    if m.batch_dims:
      raise ValueError(
        f"config.peft.targets: {'/'.join(m.path)} is a DenseGeneral with batch_dims, which LoRA does not support"
      )
    axis = (m.axis,) if isinstance(m.axis, int) else tuple(m.axis)
    features = (m.features,) if isinstance(m.features, int) else tuple(m.features)
    return tuple(a % x.ndim for a in axis), len(features)
  return (x.ndim - 1,), 1


def _kernel_names(m: nn.Module, ndim: int) -> tuple | None:
  """Logical axis names of the module's kernel (only known at init, when it is still boxed)."""
  try:
    k = m.scope.get_variable("params", "kernel")
  except Exception:  # noqa: BLE001
    return None
  names = getattr(k, "names", None)
  return tuple(names) if names is not None and len(names) == ndim else None


def lora_update(
  m: nn.Module,
  y: jax.Array,
  x: jax.Array,
  *,
  rank: int,
  scale: float,
  names: tuple[str, str] = LORA_PARAMS,
  dropout_keep: float | None = None,
  num_sets: int = 0,
  set_index: jax.Array | None = None,
) -> jax.Array:
  """y + scale * x A B for the linear layer `m` that mapped x to y, creating A and B on `m`.

  A [in, r] (kaiming-uniform, as loralib / HF PEFT), B [r, out] (zeros: the update starts at 0);
  in/out are the layer's flattened contracted input and output feature axes. dropout_keep:
  LoRA dropout's keep probability (None: none; needs the 'dropout' rng).

  num_sets = S > 0: S independent LoRA sets, A [S, in, r] and B [S, r, out], and set_index [N]
  int picks one per example of the leading batch axis (-1: no update for that example). Monkey
  (Li et al. 2024, sec. 3.1) gives each window position its own set on one shared encoder: all
  views run as one batch, each with its own LoRA.
  """
  in_axes, n_out = _linear_geometry(m, x)
  k = len(in_axes)
  trailing = tuple(range(x.ndim - k, x.ndim))
  if in_axes != trailing:
    x = jnp.moveaxis(x, in_axes, trailing)
  in_shape, out_shape = x.shape[x.ndim - k :], y.shape[y.ndim - n_out :]
  n_in, n_out_flat = math.prod(in_shape), math.prod(out_shape)
  kernel_names = _kernel_names(m, k + n_out) if m.is_initializing() else None
  lead = ((None,), (num_sets,)) if num_sets else ((), ())
  a_names = lead[0] + (kernel_names[0] if kernel_names else None, None)
  b_names = lead[0] + (None, kernel_names[k] if kernel_names else None)
  param_dtype = getattr(m, "param_dtype", jnp.float32)
  a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # U(+-1/sqrt(fan_in))
  a = m.param(names[0], nn.with_logical_partitioning(a_init, a_names), lead[1] + (n_in, rank), param_dtype)
  b = m.param(
    names[1], nn.with_logical_partitioning(nn.initializers.zeros, b_names), lead[1] + (rank, n_out_flat), param_dtype
  )
  dtype = getattr(m, "dtype", None) or jnp.result_type(x)
  h = jnp.asarray(x, dtype).reshape(x.shape[: x.ndim - k] + (n_in,))
  if dropout_keep is not None:
    mask = jax.random.bernoulli(m.make_rng("dropout"), dropout_keep, h.shape)
    h = jnp.where(mask, h / dropout_keep, 0.0).astype(dtype)
  if num_sets:
    if set_index is None or set_index.shape != (h.shape[0],):
      raise ValueError(
        f"LoRA sets at {'/'.join(m.path)}: set_index must be [{h.shape[0]}] (one per example), "
        f"got {None if set_index is None else set_index.shape}"
      )
    idx = jnp.clip(set_index, 0, num_sets - 1)
    flat = h.reshape(h.shape[0], -1, n_in)
    u = jnp.einsum("bti,bir->btr", flat, jnp.asarray(a, dtype)[idx])
    u = jnp.einsum("btr,bro->bto", u, jnp.asarray(b, dtype)[idx])
    u = jnp.where((set_index >= 0)[:, None, None], u, 0.0)
    h = u.reshape(h.shape[:-1] + (n_out_flat,))
  else:
    h = (h @ jnp.asarray(a, dtype)) @ jnp.asarray(b, dtype)
  h = (h * jnp.asarray(scale, dtype)).reshape(h.shape[:-1] + tuple(out_shape))
  return y + h.astype(y.dtype)
