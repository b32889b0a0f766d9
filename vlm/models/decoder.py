"""Decoder-only LM (Llama / Qwen2 / Gemma / Persimmon / Chameleon family) with a KV cache for vlm.decoding.

    tokens -> embed (x sqrt(width) for Gemma) -> depth x [x + Attn(RMS x); x + MLP(RMS x)] -> RMS -> head

Attention is causal self-attention with grouped KV heads and rotary position embeddings
(vlm.nn.rope, HF's half-rotation layout); optional q/k/v biases (Qwen2); gated MLP ('swiglu' for
Llama/Qwen2, 'geglu' = tanh-GELU gate for Gemma); the LM head is the transposed embedding when
`tie_embeddings`. Gemma's RMSNorm `x_hat * (1 + w)` is our `x_hat * scale` with scale = 1 + w
(the importer adds the 1; a fresh init of ones is Gemma's init of zeros).

The fields name techniques, not families: each is the Llama layout by default, and a family's layout is
a set of their values, written by its HF importer or its recipe (Persimmon's and Chameleon's query/key
norms are two forms of the one `qk_norm`; IDEFICS' cross-attention uses its 'rms' form).

Persimmon (Adept; Fuyu's decoder) sets the optional fields that default to the Llama layout:
`norm_type='layer'` (LayerNorm with bias for norm1, norm2 and the final norm), `qk_norm='layer'`
(a LayerNorm over head_dim of every query and key head, before rotary), `rotary_fraction=0.5`
(rotary on the first half of each head's channels only) and `mlp_act='relu2'` with biases
(dense_h_to_4h -> relu^2 -> dense_4h_to_h, not gated). With the defaults the parameters are exactly
the Llama ones (no bias in the norms, no query_norm / key_norm).

Chameleon (Meta; its text decoder, vlm.convert.chameleon) is Llama plus `qk_norm='layer_per_head'`
(LayerNorm over head_dim of every query and key head, before rotary, with a per-head scale and bias
[heads, hd], not shared across heads) and, where its config sets swin_norm (the paper's norm reordering
for the 34B model), `swin_norm=True`: the block's norms move to the outputs of attention and MLP,
x + norm1(Attn(x)); x + norm2(Mlp(x)) (same parameters).

Padding: a `mask` [B, T] (True/1 = real token) masks padded keys and sets rotary positions to
the number of real tokens before each one (as HF generate does for left-padded prompts), so a
left- or right-padded row gives the logits of its unpadded tokens at its real positions.

Packing: `segment_ids` [B, T] int (0 = padding, 1..k = the packed sequence a token belongs to; each
segment one contiguous run) makes attention causal within a segment only (block-diagonal causal;
padding keys masked, a query always sees itself) and restarts rotary positions at 0 at each
segment's first token, so each packed sequence gets the logits it would get alone. Training only:
decoding (`decode_step`) never packs.

Decoding (vlm.decoding's step protocol) goes through `decode_step`; vlm.models.generation wires it
up, as for every decoder family (`predict_fns(model)['generate']` is its `generate`)::

    cache = generation.init_cache(model, params, prompt, cache_len, mask=prompt_mask)
    out = decoding.generate(generation.step_fn(model, params), cache, prompt, max_new_tokens=..., eos_id=...)

The cache holds every block's keys/values [B, cache_len, K, hd] (with scan_layers one 'layers' entry
[B, depth, cache_len, K, hd]) and, at the top level, 'valid' [B, cache_len] (the prompt's padding mask,
True after it), all batch-major.

Layer scan: `scan_layers=True` runs the blocks with nn.scan (params decoder/layers/... stacked on a
leading depth axis, see vlm.nn.transformer.Stack); the HF importers write that layout with scan=True.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm import decoding
from vlm.models import generation
from vlm.nn.norms import make_norm
from vlm.nn.transformer import REMAT_POLICIES, Stack, lm_block

Dtype = Any


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Rotary positions [B, T] from a padding mask [B, T]: real tokens before this one (pads get 0)."""
  mask = mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)


def positions_from_segments(segment_ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Rotary positions [B, T] of packed rows: real tokens before this one in its own segment.

  segment_ids [B, T] (0 = padding; segments contiguous); mask: optional extra padding mask
  (True = real). Padding gets 0.
  """
  seg = segment_ids.astype(jnp.int32)
  valid = seg > 0
  if mask is not None:
    valid = valid & mask.astype(bool)
  v = valid.astype(jnp.int32)
  before = jnp.cumsum(v, axis=1) - v  # real tokens before t in the row
  start = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  base = jax.lax.cummax(jnp.where(start, before, 0), axis=1)  # `before` at the segment's first token
  return jnp.where(valid, before - base, 0)


def segment_attention_mask(segment_ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Boolean [B, 1, T, T]: key in the query's segment and real (segment > 0, mask), or the query itself.

  Combined with causal attention this is block-diagonal causal attention over packed sequences.
  """
  seg = segment_ids.astype(jnp.int32)
  valid = seg > 0
  if mask is not None:
    valid = valid & mask.astype(bool)
  t = seg.shape[1]
  same = (seg[:, :, None] == seg[:, None, :]) & valid[:, None, :]
  return (same | jnp.eye(t, dtype=bool)[None])[:, None]


class DecoderLM(nn.Module):
  """Causal LM: tokens [B, T] -> logits [B, T, vocab] (float32); position t predicts token t+1.

  Attributes:
    vocab_size, width (D), depth, num_heads, num_kv_heads (GQA), head_dim (default D // heads),
    mlp_dim, mlp_act ('swiglu' | 'geglu' gated; or a plain vlm.nn.mlp activation, e.g. 'relu2' = Persimmon's
    squared ReLU: fc1 -> act -> fc2).
    qkv_bias / out_bias / mlp_bias: biases of the q/k/v, output and MLP projections.
    rope_theta: rotary base (None: no position information at all).
    rope_scaling: None (default rope) or a scaled RoPE of current LMs, a dict {'rope_type': 'linear' |
      'dynamic' | 'llama3' | 'yarn', <its parameters>} (vlm.nn.rope.SCALING_KEYS; the HF importer fills it
      from rope_parameters / rope_scaling). 'dynamic' depends on the positions of each call (vlm.nn.rope:
      cached decoding past max_position_embeddings then differs from one uncached forward, as in HF).
    norm_eps, norm_type: 'rms' (RMSNorm, default) or 'layer' (LayerNorm with bias: Persimmon) for
      norm1, norm2 and the final norm.
    qk_norm: None (default), 'layer' or 'rms': per-head norm over head_dim of queries and keys before
      rotary (params attn/query_norm, attn/key_norm [hd], shared by the heads; Persimmon's q_layernorm /
      k_layernorm); 'layer_per_head': the same LayerNorm but with a scale and bias per head,
      attn/query_norm [num_heads, hd] and attn/key_norm [num_kv_heads, hd] (Chameleon's q_norm / k_norm).
      The qk norms use norm_eps too.
    rotary_fraction: rotate only the first int(head_dim * fraction) channels of each head
      (Persimmon's partial_rotary_factor 0.5); 1.0 (default) rotates all.
    swin_norm: False (default): pre-norm blocks x + Attn(norm1 x); x + Mlp(norm2 x). True: norms on the
      branch outputs, x + norm1(Attn x); x + norm2(Mlp x) (Chameleon's swin_norm; same parameters).
    embed_scale: multiply token embeddings by sqrt(D), rounded to the activation dtype (Gemma).
    tie_embeddings: logits = h @ embedding.T; otherwise a bias-free 'head' Dense.
    remat_policy: a key of vlm.nn.transformer.REMAT_POLICIES (training only).
    scan_layers: run the blocks with nn.scan (vlm.nn.transformer.Stack(scan=True)): one block compiled instead of depth,
      params decoder/layers/... stacked [depth, ...] on the logical axis 'layers' (the remat policy applies
      per layer inside the scan). Same function as the unrolled stack with the params stacked
      (vlm.convert.stack_encoder_blocks; the HF importers' scan=True). Cached decoding works either way:
      the cache keys/values are then [B, depth, cache_len, K, hd].

  Params: embedding/embedding [V, D] ('vocab', 'embed'), decoder/block_{i}/{norm1,attn,norm2,mlp}
  (scan_layers: decoder/layers/... with a leading depth axis), norm, head/kernel [D, V] (untied only).
  """

  vocab_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  mlp_act: str = "swiglu"
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  rope_theta: float | None = 10000.0
  rope_scaling: dict | None = None
  norm_eps: float = 1e-6
  norm_type: str = "rms"
  qk_norm: str | None = None
  rotary_fraction: float = 1.0
  swin_norm: bool = False
  embed_scale: bool = False
  tie_embeddings: bool = False
  dropout: float = 0.0
  remat_policy: str = "none"
  scan_layers: bool = False
  dtype: Dtype = None

  # The module running the blocks (fields depth, block, remat_policy, and `scan` if it can scan them); a
  # subclass may swap it (vlm.models.flamingo interleaves cross-attention between the blocks, so it has no
  # `scan` and scan_layers=True is refused). Not a dataclass field.
  stack_class = Stack

  def setup(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; known: {sorted(REMAT_POLICIES)}")
    self.embedding = nn.Embed(
      self.vocab_size,
      self.width,
      dtype=self.dtype,
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
    )
    kw = lm_block(
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      num_kv_heads=self.num_kv_heads,
      head_dim=self.head_dim,
      mlp_act=self.mlp_act,
      qkv_bias=self.qkv_bias,
      out_bias=self.out_bias,
      mlp_bias=self.mlp_bias,
      rope_theta=self.rope_theta,
      norm_eps=self.norm_eps,
      rope_scaling=self.rope_scaling,
      norm=self.norm_type,
      qk_norm=self.qk_norm,
      rotary_fraction=self.rotary_fraction,
      swin_norm=self.swin_norm,
      dropout=self.dropout,
      dtype=self.dtype,
    )
    stack_kw = dict(depth=self.depth, block=kw, remat_policy=self.remat_policy)
    if self.scan_layers:
      if "scan" not in getattr(self.stack_class, "__dataclass_fields__", {}):
        raise ValueError(
          f"{type(self).__name__}: scan_layers=True is not supported: its layer stack "
          f"{self.stack_class.__name__} runs the blocks one by one; set scan_layers=False"
        )
      stack_kw["scan"] = True
    self.decoder = self.stack_class(**stack_kw, name="decoder")
    self.norm = make_norm(self.norm_type, self.norm_eps, self.dtype, name="norm")
    if not self.tie_embeddings:
      self.head = nn.Dense(
        self.vocab_size,
        use_bias=False,
        dtype=self.dtype,
        name="head",
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
      )

  # ------------------------------------------------------------------------ pieces

  def embed(self, tokens: jax.Array) -> jax.Array:
    """Token embeddings [B, T, D] (Gemma's sqrt(D) scaling included: HF scales inside its embedding)."""
    x = self.embedding(tokens)
    if self.embed_scale:
      x = x * jnp.asarray(self.width**0.5, x.dtype)
    return x

  def logits(self, h: jax.Array) -> jax.Array:
    """Final hidden states [B, T, D] (after `norm`) -> logits [B, T, V] float32."""
    out = self.embedding.attend(h) if self.tie_embeddings else self.head(h)
    return out.astype(jnp.float32)

  def _blocks(self, x, mask, positions, train, decode=False, index=0, cache_len=None):
    h = self.decoder(
      x, mask=mask, positions=positions, deterministic=not train, decode=decode, index=index, cache_len=cache_len
    )
    return self.norm(h)

  # ------------------------------------------------------------------------ forward

  def hidden_states(
    self,
    inputs_embeds: jax.Array,
    mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    train: bool = False,
    segment_ids: jax.Array | None = None,
  ) -> jax.Array:
    """inputs_embeds [B, T, D] -> final normed states [B, T, D].

    mask: padding [B, T] (True = real); positions: rotary positions [B, T] (default: from
    segment_ids, else from mask, else 0..T-1); segment_ids: packed sequences [B, T] (0 = padding,
    see the module docstring): attention stays within a segment and positions restart per segment.
    """
    t = inputs_embeds.shape[1]
    attn_mask = None
    if segment_ids is not None:
      if positions is None:
        positions = positions_from_segments(segment_ids, mask)
      attn_mask = segment_attention_mask(segment_ids, mask)
    elif mask is not None:
      mask = mask.astype(bool)
      if positions is None:
        positions = positions_from_mask(mask)
      # Keys: real tokens, plus the query itself so a padded row never attends to nothing.
      attn_mask = mask[:, None, None, :] | jnp.eye(t, dtype=bool)[None, None]
    if positions is None:
      positions = jnp.arange(t)
    x = inputs_embeds.astype(self.dtype) if self.dtype is not None else inputs_embeds
    return self._blocks(x, attn_mask, positions, train)

  def __call__(
    self,
    tokens: jax.Array | None = None,
    train: bool = False,
    *,
    mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    inputs_embeds: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
  ) -> jax.Array:
    """Logits [B, T, V] from tokens [B, T] or from inputs_embeds [B, T, D] (e.g. `embed(tokens)` with
    image embeddings written at placeholder positions). mask / positions / segment_ids (packed
    rows): see hidden_states."""
    if (tokens is None) == (inputs_embeds is None):
      raise ValueError("DecoderLM: pass exactly one of tokens and inputs_embeds")
    if inputs_embeds is None:
      inputs_embeds = self.embed(tokens)
    return self.logits(self.hidden_states(inputs_embeds, mask, positions, train, segment_ids))

  # ------------------------------------------------------------------------ cached decoding

  def decode_step(
    self,
    tokens: jax.Array | None,
    index: jax.Array | int,
    cache_len: int | None = None,
    mask: jax.Array | None = None,
    inputs_embeds: jax.Array | None = None,
  ) -> jax.Array:
    """Cached decoding: tokens [B, T] (or inputs_embeds [B, T, D]) at cache slots [index, index + T)
    -> logits [B, T, V].

    The call that creates the cache (mutable=['cache']) gives `cache_len` and, for padded prompts,
    the prompt's padding `mask` [B, T] (T <= cache_len; slots after it count as real). Later calls
    pass neither: padded slots stay masked and rotary positions skip them.
    """
    if inputs_embeds is None:
      inputs_embeds = self.embed(tokens)
    b, t = inputs_embeds.shape[:2]
    index = jnp.asarray(index, jnp.int32)
    is_new = not self.has_variable("cache", "valid")
    if is_new:
      length = cache_len or t
      valid = jnp.ones((b, length), bool)
      if mask is not None:
        valid = jax.lax.dynamic_update_slice(valid, mask.astype(bool), (0, 0))
    else:
      valid = self.get_variable("cache", "valid")
    self.put_variable("cache", "valid", valid)
    slots = index + jnp.arange(t)
    positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
    positions = jnp.take(positions, slots, axis=1)  # [B, T]
    own = jnp.arange(valid.shape[1])[None, :] == slots[:, None]  # [T, cache_len]
    attn_mask = valid[:, None, None, :] | own[None, None]
    x = inputs_embeds.astype(self.dtype) if self.dtype is not None else inputs_embeds
    h = self._blocks(x, attn_mask, positions, False, decode=True, index=index, cache_len=valid.shape[1])
    return self.logits(h)


def predict_fns(model: DecoderLM) -> dict[str, Any]:
  """generate(params, images, prompt, **kw): decodes after prompt [B, P] (left-padded rows: pass
  `mask`) with the KV cache (vlm.models.generation; kw as there), jit-able with static sizes. The
  signature of every family's generate; a text-only LM takes images=None."""

  def generate(params, images, prompt, **kw) -> decoding.DecodeOutput:
    if images is not None:
      raise ValueError("a text-only language model (decoder_lm) generates from a prompt alone: pass images=None")
    return generation.generate(model, params, prompt, **kw)

  return {"generate": generate}
