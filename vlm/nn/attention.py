"""Multi-head attention (self and cross; causal and padding masks; qk-norm; grouped KV heads).

All attention goes through `jax.nn.dot_product_attention`. Its implementation is the trainer's
`config.attention_impl` (ATTENTION_IMPLS), set while tracing with `attention_implementation(...)`:
'xla'; 'cudnn' (cuDNN flash attention; fails where cuDNN cannot run the shapes); or 'auto' (the
default), cuDNN on GPU where `cudnn_supported` says the shapes and dtypes allow, XLA elsewhere (jax's
own `implementation=None` is XLA everywhere today). The choice is read when a function is traced:
a jitted function keeps the implementation it was first traced with.
"""

import contextlib
import threading
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.nn.norms import make_norm
from vlm.nn.rope import apply_rope, rotary_dims

Dtype = Any

QK_NORMS = (None, "layer", "rms", "layer_per_head")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
_IMPL = threading.local()


@contextlib.contextmanager
def attention_implementation(impl: str | None):
  """Within the block, MultiHeadAttention traces with `impl` (one of ATTENTION_IMPLS; None: 'auto')."""
  impl = impl or "auto"
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
  previous = getattr(_IMPL, "value", "auto")
  _IMPL.value = impl
  try:
    yield
  finally:
    _IMPL.value = previous


def current_attention_implementation() -> str:
  return getattr(_IMPL, "value", "auto")


def cudnn_supported(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> bool:
  """Whether cuDNN flash attention runs q [B, T, N, hd], k [B, S, K, hd] (+ a mask) on this backend.

  The conditions of jax's cuDNN path (jax._src.cudnn.fused_attention_stablehlo): a GPU, fp16/bf16
  queries and keys of one dtype, hd a multiple of 8 and at most 128 (256 on Hopper; 128 here, which
  every GPU takes), and with a mask (it becomes a bias) even T and S.
  """
  if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
    return False
  hd = q.shape[-1]
  if hd % 8 or hd > 128 or k.shape[-1] != hd:
    return False
  return mask is None or (q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0)


def resolve_implementation(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> str:
  """The `implementation` passed to jax.nn.dot_product_attention for these inputs ('xla' or 'cudnn')."""
  impl = current_attention_implementation()
  if impl == "auto":
    return "cudnn" if cudnn_supported(q, k, mask) else "xla"
  return impl


def make_qk_norm(kind: str, eps: float = 1e-6, dtype: Dtype = None, name: str | None = None) -> nn.Module:
  """The norm of queries or keys [..., heads, hd], over hd (see MultiHeadAttention.qk_norm).

  'layer' / 'rms': vlm.nn.norms.make_norm, params scale (+ bias) [hd] shared by all heads.
  'layer_per_head': LayerNorm statistics over hd, then a per-head affine: scale and bias [heads, hd]
  (logical axes 'heads', 'kv'), as Chameleon's ChameleonLayerNorm.
  """
  if kind == "layer_per_head":
    return nn.LayerNorm(
      epsilon=eps,
      dtype=dtype,
      reduction_axes=-1,
      feature_axes=(-2, -1),
      name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("heads", "kv")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")),
    )
  if kind not in QK_NORMS:
    raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {kind!r}")
  return make_norm(kind, eps, dtype, name=name)


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
    in_shape = x.shape[-self.in_dims :]
    n_in, n_out = len(in_shape), len(self.features)
    init = nn.initializers.variance_scaling(
      1.0, "fan_avg", "uniform", in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out))
    )
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), in_shape + tuple(self.features))
    dtype = self.dtype or x.dtype
    x, kernel = jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)
    y = jax.lax.dot_general(x, kernel, (((tuple(range(x.ndim - n_in, x.ndim))), tuple(range(n_in))), ((), ())))
    if self.use_bias:
      bias = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[n_in:]), tuple(self.features)
      )
      y = y + jnp.asarray(bias, dtype)
    return y


class MultiHeadAttention(nn.Module):
  """Attention [B, Tq, D] x [B, Tk, Dkv] -> [B, Tq, out_dim or D].

  Attributes:
    num_heads: query heads N.
    num_kv_heads: key/value heads K (N % K == 0); K < N is grouped-query attention.
    head_dim: per-head width; default D // N.
    qk_norm: None, 'layer' or 'rms': normalise queries and keys per head over head_dim, before rotary
      (Dehghani et al. 2023), one scale (and bias) [hd] shared by all heads (params query_norm,
      key_norm); 'layer_per_head': LayerNorm over head_dim with a per-head scale and bias, [N, hd]
      for query_norm and [K, hd] for key_norm (Chameleon). See make_qk_norm.
    use_bias: biases on the q/k/v/out projections.
    out_bias: bias on the output projection (default: use_bias; Qwen2 has q/k/v biases only).
    rope_theta: if set, rotary position embeddings (vlm.nn.rope, base theta) on queries and keys of
      self-attention, at absolute positions: `positions` if given, else the cache slots
      (index + t) when decoding, else 0..T-1. Keys are cached rotated. None: no rotation.
    rotary_fraction: rotate only the first int(hd * fraction) channels of each head (Persimmon's
      partial_rotary_factor 0.5; vlm.nn.rope); 1.0 rotates all of them.

  Autoregressive decoding (`decode=True`) keeps keys and values in the 'cache' collection, every
  leaf batch-major (vlm.decoding's convention):
    - self-attention: 'key'/'value' [B, cache_len, K, hd]. A call with T tokens writes them at
      slots [index, index + T) and attends causally (by slot) over the cache. The call that
      creates the cache sizes it `cache_len` (default T).
    - cross-attention: 'cross_key'/'cross_value' [B, S, K, hd], projected from `kv` by the call
      that creates the cache; later calls reuse them (their `kv` may be None).
  """

  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  out_dim: int | None = None
  use_bias: bool = True
  qk_norm: str | None = None
  norm_eps: float = 1e-6
  out_bias: bool | None = None
  rope_theta: float | None = None
  rotary_fraction: float = 1.0
  dtype: Dtype = None

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    kv: jax.Array | None = None,
    *,
    mask: jax.Array | None = None,
    causal: bool = False,
    decode: bool = False,
    index: jax.Array | int = 0,
    cache_len: int | None = None,
    cross: bool | None = None,
    positions: jax.Array | None = None,
    values: jax.Array | None = None,
  ) -> jax.Array:
    """mask: boolean, broadcastable to [B, N, Tq, Tk]; True = may attend.

    decode: use the KV cache (see the class docstring); `index` is the cache slot of x's first
    token; `mask`, if given, is then broadcastable to [B, N, Tq, cache_len] (self) or [B, N, Tq, S].
    cross: whether this is cross-attention (default: `kv is not None`; needed when decoding
    reuses cached cross keys with kv=None).
    positions: rotary positions [B, Tq] or [Tq] of x's tokens (self-attention; rope_theta only).
    values: the value projection's input [B, Tk, Dkv] when it differs from the keys' `kv` (Qwen-VL's
    resampler adds position embeddings to the keys only); not with decode.
    """
    if values is not None and decode:
      raise ValueError("MultiHeadAttention: `values` does not work with decode=True")
    cross = (kv is not None) if cross is None else cross
    kv = x if kv is None else kv
    d = x.shape[-1]
    n = self.num_heads
    k_heads = self.num_kv_heads or n
    if n % k_heads:
      raise ValueError(f"num_heads={n} must be a multiple of num_kv_heads={k_heads}")
    hd = self.head_dim or d // n

    def proj(name, inp, heads):
      return HeadsDense((heads, hd), ("embed", "heads", "kv"), self.use_bias, self.dtype, name=name)(inp)

    def key_value(inp):
      k, v = proj("key", inp, k_heads), proj("value", inp if values is None else values, k_heads)
      if self.qk_norm:
        k = make_qk_norm(self.qk_norm, self.norm_eps, self.dtype, name="key_norm")(k)
      return k, v

    q = proj("query", x, n)
    if self.qk_norm:
      q = make_qk_norm(self.qk_norm, self.norm_eps, self.dtype, name="query_norm")(q)
    if decode and cross:
      k, v = self._cached_cross_kv(kv, key_value)
    else:
      k, v = key_value(kv)
    if self.rope_theta is not None and not cross:
      if positions is None:
        positions = jnp.arange(x.shape[1]) + (jnp.asarray(index, jnp.int32) if decode else 0)
      rd = rotary_dims(hd, self.rotary_fraction)
      q = apply_rope(q, positions, self.rope_theta, rd)
      k = apply_rope(k, positions, self.rope_theta, rd)
    if decode and not cross:
      k, v, mask = self._update_self_cache(k, v, mask, index, cache_len)
      causal = False  # the cache mask is causal in slot coordinates
    q = nn.with_logical_constraint(q, ("act_batch", "act_len", "act_heads", None))
    k = nn.with_logical_constraint(k, ("act_batch", "act_len", "act_heads", None))
    v = nn.with_logical_constraint(v, ("act_batch", "act_len", "act_heads", None))
    if self.dtype is not None:
      q, k, v = (jnp.asarray(t, self.dtype) for t in (q, k, v))
    impl = resolve_implementation(q, k, mask)
    if mask is not None:
      mask = mask.astype(bool)
      if impl == "cudnn":  # cuDNN takes the mask as a bias of full [.., Tq, Tk]; batch and heads may be 1
        mask = jnp.broadcast_to(mask, (*mask.shape[:-2], q.shape[1], k.shape[1]))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=impl)
    out_bias = self.use_bias if self.out_bias is None else self.out_bias
    return HeadsDense((self.out_dim or d,), ("heads", "kv", "embed"), out_bias, self.dtype, in_dims=2, name="out")(out)

  def _cached_cross_kv(self, kv, key_value):
    """Cross-attention K/V: projected once (when the cache is created), then read from the cache."""
    if self.has_variable("cache", "cross_key"):
      return self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")
    if kv is None:
      raise ValueError("cross-attention decoding: the call that creates the cache needs the context `kv`")
    k, v = key_value(kv)
    self.put_variable("cache", "cross_key", k)
    self.put_variable("cache", "cross_value", v)
    return k, v

  def _update_self_cache(self, k, v, mask, index, cache_len):
    """Writes k, v [B, T, K, hd] at slots [index, index + T); returns the cache and its causal mask.

    The first call allocates the cache ([B, cache_len or T, K, hd], zeros) and writes into it too.
    Slots after a query's own position are masked, so unwritten slots are never attended.
    """
    b, t = k.shape[:2]
    if not self.has_variable("cache", "key"):
      length = cache_len or t
      if length < t:
        raise ValueError(f"cache_len={length} is shorter than the {t} tokens of the first decoding call")
      for name, val in (("key", k), ("value", v)):
        self.put_variable("cache", name, jnp.zeros((b, length) + val.shape[2:], val.dtype))
    index = jnp.asarray(index, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    ck = jax.lax.dynamic_update_slice(self.get_variable("cache", "key"), k, (zero, index, zero, zero))
    cv = jax.lax.dynamic_update_slice(self.get_variable("cache", "value"), v, (zero, index, zero, zero))
    self.put_variable("cache", "key", ck)
    self.put_variable("cache", "value", cv)
    q_pos = index + jnp.arange(t)
    cache_mask = (jnp.arange(ck.shape[1])[None, :] <= q_pos[:, None])[None, None]
    return ck, cv, cache_mask if mask is None else cache_mask & mask
