"""Multi-head attention (self and cross; causal and padding masks; qk-norm; grouped KV heads).

All attention goes through `jax.nn.dot_product_attention`, which dispatches to cuDNN flash
attention on GPU when shapes and dtypes allow, and to XLA elsewhere.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.nn.norms import make_norm

Dtype = Any


def make_attention_mask(q_valid: jax.Array | None, kv_valid: jax.Array | None) -> jax.Array | None:
  """Boolean mask [B, 1, Tq, Tk] from per-token validity [B, Tq] / [B, Tk] (either may be None)."""
  if q_valid is None and kv_valid is None:
    return None
  if kv_valid is None:
    return q_valid[:, None, :, None].astype(bool)
  mask = kv_valid[:, None, None, :].astype(bool)
  if q_valid is not None:
    mask = mask & q_valid[:, None, :, None].astype(bool)
  return mask


class HeadsDense(nn.Module):
  """A linear map contracting the last `in_dims` axes into `features`, kernel [*in, *features].

  Kernels are created in their final shape (not flattened and reshaped, as nn.DenseGeneral
  does), so init-time sharding constraints see the real logical axes. Xavier-uniform init over
  the total fan-in and fan-out.
  """

  features: tuple[int, ...]
  axes: tuple[str, ...]
  use_bias: bool = True
  dtype: Dtype = None
  in_dims: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[-self.in_dims:]
    n_in, n_out = len(in_shape), len(self.features)
    init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=tuple(range(n_in)),
                                            out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), in_shape + tuple(self.features))
    dtype = self.dtype or x.dtype
    x, kernel = jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)
    y = jax.lax.dot_general(x, kernel, (((tuple(range(x.ndim - n_in, x.ndim))), tuple(range(n_in))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[n_in:]),
                        tuple(self.features))
      y = y + jnp.asarray(bias, dtype)
    return y


class MultiHeadAttention(nn.Module):
  """Attention [B, Tq, D] x [B, Tk, Dkv] -> [B, Tq, out_dim or D].

  Attributes:
    num_heads: query heads N.
    num_kv_heads: key/value heads K (N % K == 0); K < N is grouped-query attention.
    head_dim: per-head width; default D // N.
    qk_norm: None, 'layer' or 'rms': normalise queries and keys per head (Dehghani et al. 2023).
    use_bias: biases on the q/k/v/out projections.
  """

  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  out_dim: int | None = None
  use_bias: bool = True
  qk_norm: str | None = None
  norm_eps: float = 1e-6
  dtype: Dtype = None

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      kv: jax.Array | None = None,
      *,
      mask: jax.Array | None = None,
      causal: bool = False,
  ) -> jax.Array:
    """mask: boolean, broadcastable to [B, N, Tq, Tk]; True = may attend."""
    kv = x if kv is None else kv
    d = x.shape[-1]
    n = self.num_heads
    k_heads = self.num_kv_heads or n
    if n % k_heads:
      raise ValueError(f"num_heads={n} must be a multiple of num_kv_heads={k_heads}")
    hd = self.head_dim or d // n

    def proj(name, inp, heads):
      return HeadsDense((heads, hd), ("embed", "heads", "kv"), self.use_bias, self.dtype, name=name)(inp)

    q = proj("query", x, n)
    k = proj("key", kv, k_heads)
    v = proj("value", kv, k_heads)
    if self.qk_norm:
      q = make_norm(self.qk_norm, self.norm_eps, self.dtype, name="query_norm")(q)
      k = make_norm(self.qk_norm, self.norm_eps, self.dtype, name="key_norm")(k)
    q = nn.with_logical_constraint(q, ("act_batch", "act_len", "act_heads", None))
    k = nn.with_logical_constraint(k, ("act_batch", "act_len", "act_heads", None))
    v = nn.with_logical_constraint(v, ("act_batch", "act_len", "act_heads", None))
    if self.dtype is not None:
      q, k, v = (jnp.asarray(t, self.dtype) for t in (q, k, v))
    if mask is not None:
      mask = mask.astype(bool)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    return HeadsDense((self.out_dim or d,), ("heads", "kv", "embed"), self.use_bias, self.dtype, in_dims=2,
                      name="out")(out)
