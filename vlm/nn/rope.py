"""Rotary position embeddings (Su et al. 2021) in the half-rotation layout of HF Llama's `rotate_half`.

Channel i of the first half of each head pairs with channel i + hd/2 of the second half, rotated by
angle `pos * inv_freq[i]`, inv_freq[i] = theta ** (-2i / hd) for the default rope. Angles are computed
in float32; the rotated tensor keeps its dtype.

Partial rotary (GPT-NeoX / Persimmon's `partial_rotary_factor`): only the first r = int(hd * fraction)
channels of each head are rotated, in the same half-rotation layout with hd replaced by r (pairs i and
i + r/2, angle `pos * theta ** (-2i / r)`); channels r.. pass through unchanged, as in HF's
`query_rot, query_pass = q[..., :r], q[..., r:]`.

Scaled RoPE (the `rope_type`s of transformers' modeling_rope_utils that current LMs use). A scaling is a
dict `{'rope_type': ..., <its parameters>}` (DecoderLM's `rope_scaling`; `scaling_from_hf` makes one
from a transformers `rope_parameters` dict, resolving every default the way transformers does, and
`scaling_to_hf` writes it back):

- 'linear'  {factor}: inv_freq / factor (position interpolation).
- 'llama3'  {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings} (Llama 3.1 and
  its distillations): wavelengths longer than original / low_freq_factor are divided by factor, shorter
  than original / high_freq_factor kept, the band between interpolated smoothly.
- 'yarn'    {factor, original_max_position_embeddings, beta_fast, beta_slow, truncate, attention_factor}
  (Peng et al. 2023): per-frequency blend of the interpolated (inv_freq / factor) and original
  frequencies by a linear ramp over the correction range [low, high] found from beta_fast / beta_slow
  rotations over the original context (floor / ceil when `truncate`); cos and sin are multiplied by
  `attention_factor` (transformers: 0.1 ln(factor) + 1, or the mscale / mscale_all_dim ratio).
- 'dynamic' {factor, max_position_embeddings} (NTK-aware dynamic scaling): depends on the length of the
  sequence seen, L = max(positions) + 1 over the whole call (every row: transformers' `seq_len =
  torch.max(position_ids) + 1`); for L > M = max_position_embeddings the base becomes
  theta * (factor * L / M - (factor - 1)) ** (r / (r - 2)) (r = rotated channels), else theta.
  This is the stateless definition: a function of the positions of the current call only. Under KV-cached
  decoding every call rotates its own queries and keys with the frequencies of its own L (the prefill:
  the prompt's length; each step: the position of its token + 1) and the cache keeps each key rotated
  as it was when written. That is exactly what transformers does in one `generate` from a fresh model
  (its `dynamic_rope_update` grows inv_freq with every longer call), so cached greedy decoding matches it
  step by step; it also means a cached decode past M is not the same as one uncached forward over the
  whole sequence (in transformers too). transformers' module additionally keeps state across calls: after
  a call with L1 > M, a later call with M <= L2 < L1 reuses L1's frequencies (it only regrows or resets
  below M); vlm has no such state and uses L2 (= what a freshly loaded transformers model computes).

`rope_frequencies(head_dim, theta)` is the default; `inv_frequencies(dim, rope, seq_len)` handles all
types. `apply_rope(x, positions, rope)` takes `rope` = a float theta (default rope) or a `ScaledRope`
(`make_rope(theta, scaling)`), which is what vlm.nn.attention.MultiHeadAttention passes through as its
`rope_theta` (DecoderLM builds it from rope_theta + rope_scaling).
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

# The canonical parameters of each scaled type (what DecoderLM's rope_scaling holds besides rope_type).
SCALING_KEYS: dict[str, tuple[str, ...]] = {
  "linear": ("factor",),
  "dynamic": ("factor", "max_position_embeddings"),
  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
  "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate", "attention_factor"),
}
ROPE_TYPES = ("default",) + tuple(SCALING_KEYS)


@dataclasses.dataclass(frozen=True)
class ScaledRope:
  """theta + a validated scaling (hashable: a flax module field)."""

  theta: float
  rope_type: str
  params: tuple[tuple[str, Any], ...]

  def get(self, key: str) -> Any:
    return dict(self.params)[key]

  @property
  def attention_factor(self) -> float:
    return float(self.get("attention_factor")) if self.rope_type == "yarn" else 1.0


def check_scaling(scaling: Mapping[str, Any]) -> dict[str, Any]:
  """A rope_scaling dict in canonical form (rope_type + exactly SCALING_KEYS[rope_type]); ValueError
  naming what is wrong."""
  scaling = dict(scaling)
  rope_type = scaling.pop("rope_type", None)
  if rope_type not in SCALING_KEYS:
    raise ValueError(
      f"rope_scaling: rope_type {rope_type!r} is not supported; supported: {sorted(SCALING_KEYS)} "
      "(None for the default rope)"
    )
  want = set(SCALING_KEYS[rope_type])
  if set(scaling) != want:
    raise ValueError(
      f"rope_scaling {rope_type!r}: needs exactly {sorted(want)}; missing "
      f"{sorted(want - set(scaling))}, unknown {sorted(set(scaling) - want)}"
    )
  if rope_type == "yarn":
    scaling["truncate"] = bool(scaling["truncate"])
    for k in ("factor", "beta_fast", "beta_slow", "attention_factor"):
      scaling[k] = float(scaling[k])
    scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
  else:
    for k in SCALING_KEYS[rope_type]:
      scaling[k] = int(scaling[k]) if k.endswith("max_position_embeddings") else float(scaling[k])
  return dict(rope_type=rope_type, **scaling)


def make_rope(theta: float | None, scaling: Mapping[str, Any] | None = None) -> "float | ScaledRope | None":
  """What MultiHeadAttention's rope_theta gets: theta itself (default rope, or None: no rope), or a
  ScaledRope when `scaling` is given."""
  if scaling is None:
    return theta
  if theta is None:
    raise ValueError("rope_scaling needs rope_theta (rope_theta=None means no rotary embedding)")
  s = check_scaling(scaling)
  return ScaledRope(float(theta), s.pop("rope_type"), tuple(sorted(s.items())))


def scaling_from_hf(rope_parameters: Mapping[str, Any], max_position_embeddings: int) -> dict[str, Any] | None:
  """transformers 5's rope_parameters (vlm.convert.hf_config.rope_parameters) -> DecoderLM's rope_scaling
  (None for 'default'), each default resolved as modeling_rope_utils does. ValueError for other types
  or missing keys (the importer names the config key)."""
  rp = dict(rope_parameters)
  rope_type = rp.get("rope_type", rp.get("type", "default"))
  if rope_type == "default":
    return None
  if rope_type not in SCALING_KEYS:
    raise ValueError(f"rope_type {rope_type!r} is not supported by vlm; supported: {list(ROPE_TYPES)}")
  if rp.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(
      f"partial_rotary_factor {rp['partial_rotary_factor']} with rope_type {rope_type!r} is not "
      "supported (the scaled frequencies would cover part of the head only)"
    )

  def need(key):
    if rp.get(key) is None:
      raise ValueError(f"rope_type {rope_type!r} needs {key!r}")
    return rp[key]

  if rope_type == "linear":
    return dict(rope_type="linear", factor=float(need("factor")))
  if rope_type == "dynamic":
    return dict(rope_type="dynamic", factor=float(need("factor")), max_position_embeddings=int(max_position_embeddings))
  if rope_type == "llama3":
    return check_scaling(
      dict(
        rope_type="llama3",
        factor=need("factor"),
        low_freq_factor=need("low_freq_factor"),
        high_freq_factor=need("high_freq_factor"),
        original_max_position_embeddings=need("original_max_position_embeddings"),
      )
    )
  # yarn (_compute_yarn_parameters): factor None -> max / original; attention_factor from mscale(s).
  original = int(need("original_max_position_embeddings"))
  factor = rp.get("factor")
  factor = max_position_embeddings / original if factor is None else float(factor)
  attention = rp.get("attention_factor")
  if attention is None:

    def mscale(scale, m=1.0):
      return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = rp.get("mscale"), rp.get("mscale_all_dim")
    attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
  return check_scaling(
    dict(
      rope_type="yarn",
      factor=factor,
      original_max_position_embeddings=original,
      beta_fast=rp.get("beta_fast") or 32,
      beta_slow=rp.get("beta_slow") or 1,
      truncate=rp.get("truncate", True),
      attention_factor=attention,
    )
  )


def scaling_to_hf(scaling: Mapping[str, Any] | None) -> dict[str, Any]:
  """DecoderLM's rope_scaling -> the keys of transformers' rope_parameters (without rope_theta); for
  'dynamic', max_position_embeddings belongs to the config's top level and is left out here."""
  if scaling is None:
    return {"rope_type": "default"}
  s = check_scaling(scaling)
  s.pop("max_position_embeddings", None)
  return s


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
  """Inverse frequencies [hd/2], float32: theta ** (-2i / hd), as HF's default rope."""
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def inv_frequencies(dim: int, rope: "float | ScaledRope", seq_len: jax.Array | int | None = None) -> jax.Array:
  """Inverse frequencies [dim/2] float32 of a rope (a theta, or a ScaledRope) for `dim` rotated channels.

  seq_len: the sequence length seen (max position + 1); only 'dynamic' reads it (None: no scaling)."""
  if not isinstance(rope, ScaledRope):
    return rope_frequencies(dim, rope)
  if dim % 2:
    raise ValueError(f"rotary embeddings need an even head_dim, got {dim}")
  t, theta = rope.rope_type, rope.theta
  exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  if t == "linear":
    return rope_frequencies(dim, theta) / jnp.float32(rope.get("factor"))
  if t == "dynamic":
    if seq_len is None:
      return rope_frequencies(dim, theta)
    factor, m = rope.get("factor"), rope.get("max_position_embeddings")
    length = jnp.maximum(jnp.asarray(seq_len, jnp.int32), m).astype(jnp.float32)
    base = theta * ((factor * length / m) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base**exponents)
  if t == "llama3":
    inv = rope_frequencies(dim, theta)
    factor, low, high = rope.get("factor"), rope.get("low_freq_factor"), rope.get("high_freq_factor")
    old = rope.get("original_max_position_embeddings")
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return jnp.where(medium, smoothed, scaled)
  if t == "yarn":
    factor, original = rope.get("factor"), rope.get("original_max_position_embeddings")

    def correction_dim(rotations):
      return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(rope.get("beta_fast")), correction_dim(rope.get("beta_slow"))
    if rope.get("truncate"):
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
      high += 0.001  # as transformers: no singularity
    pos_freqs = theta**exponents
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # the extrapolation factor
    return interpolation * (1 - keep) + extrapolation * keep
  raise ValueError(t)


def rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def rotary_dims(head_dim: int, fraction: float = 1.0) -> int:
  """Rotated channels per head: int(head_dim * fraction), truncated as HF's rotary_ndims."""
  r = int(head_dim * fraction)
  if not 0 < r <= head_dim or r % 2:
    raise ValueError(
      f"rotary fraction {fraction} of head_dim {head_dim} gives {r} rotated channels; "
      "need an even number in (0, head_dim]"
    )
  return r


def apply_rope(
  x: jax.Array, positions: jax.Array, theta: "float | ScaledRope", rotary_dim: int | None = None
) -> jax.Array:
  """Rotates x [B, T, H, hd] by integer (or float) positions [B, T] or [T].

  theta: the base (default rope) or a ScaledRope (make_rope). rotary_dim: rotate only the first r
  channels of each head (partial rotary; default all hd).
  """
  hd = x.shape[-1]
  if rotary_dim is not None and rotary_dim != hd:
    if not 0 < rotary_dim < hd:
      raise ValueError(f"rotary_dim={rotary_dim} must be in (0, head_dim={hd}]")
    return jnp.concatenate([apply_rope(x[..., :rotary_dim], positions, theta), x[..., rotary_dim:]], axis=-1)
  positions = jnp.asarray(positions)
  if positions.ndim == 1:
    positions = positions[None]
  seq_len = None
  if isinstance(theta, ScaledRope) and theta.rope_type == "dynamic":
    seq_len = jnp.max(positions).astype(jnp.int32) + 1  # transformers: torch.max(position_ids) + 1
  freqs = positions.astype(jnp.float32)[..., None] * inv_frequencies(hd, theta, seq_len)  # [B, T, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, hd]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  if isinstance(theta, ScaledRope) and theta.attention_factor != 1.0:  # YaRN: scales cos and sin (float32)
    cos, sin = cos * theta.attention_factor, sin * theta.attention_factor
  # HF casts cos/sin to the activation dtype before the products; do the same.
  cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
  return x * cos + rotate_half(x) * sin
