"""The one `generate` of every decoder-based family: a linen model's KV-cached `decode_step` driven
by vlm.decoding (greedy, sampling, beam search; guided decoding with a contrasting input).

The decode_step protocol (DecoderLM, VisionLanguageModel, Flamingo, CoCa, EarlyFusionLM)::

  model.decode_step(tokens [B, T], index, cache_len=..., [mask=...], **inputs) -> logits [B, T, V]

The call that creates the cache (mutable=['cache'], index 0, the whole prompt) gets cache_len, the
prompt's padding mask and every input; vlm.decoding then feeds the prompt again from slot 0 (the
prefill) and one token at a time after it. `cache_inputs` (media whose keys/values the model caches
when the cache is made: Flamingo's images, CoCa's caption context) go to the creating call only;
`prefill_inputs` (what the prompt's embeddings are built from: a VLM's images, instruction and AnyRes
layout) go to the creating call and to the prefill, never to single-token steps.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm import decoding


def _present(inputs: Mapping[str, Any] | None) -> dict[str, Any]:
  return {k: v for k, v in (inputs or {}).items() if v is not None}


def init_cache(
  model: nn.Module, params: Any, prompt: jax.Array, cache_len: int, mask: jax.Array | None = None, **inputs
) -> Any:
  """A fresh cache with cache_len slots, made by decode_step on prompt [B, P] with its mask and inputs
  (None-valued inputs left out); vlm.decoding prefills the prompt again from slot 0."""
  kw = dict(cache_len=cache_len, **_present(inputs))
  if mask is not None:
    kw["mask"] = mask
  _, variables = model.apply({"params": params}, prompt, 0, **kw, method=type(model).decode_step, mutable=["cache"])
  return variables["cache"]


def step_fn(
  model: nn.Module, params: Any, prefill_inputs: Mapping[str, Any] | None = None, prompt_len: int = 0
) -> decoding.StepFn:
  """vlm.decoding's step_fn(cache, tokens, index) -> (logits, cache) of decode_step; prefill_inputs go
  with the prefill (tokens [B, prompt_len], prompt_len > 1) only."""
  prefill_inputs = _present(prefill_inputs)

  def step(cache, tokens, index):
    kw = prefill_inputs if tokens.shape[1] == prompt_len and prompt_len > 1 else {}
    logits, new = model.apply(
      {"params": params, "cache": cache}, tokens, index, **kw, method=type(model).decode_step, mutable=["cache"]
    )
    return logits, new["cache"]

  return step


def generate(
  model: nn.Module,
  params: Any,
  prompt: jax.Array,
  *,
  max_new_tokens: int,
  eos_id: int,
  pad_id: int = 0,
  mask: jax.Array | None = None,
  method: str = "greedy",
  rng: jax.Array | None = None,
  cache_len: int | None = None,
  cache_inputs: Mapping[str, Any] | None = None,
  prefill_inputs: Mapping[str, Any] | None = None,
  contrast_inputs: Mapping[str, Any] | None = None,
  guidance: float = 1.0,
  plausibility: float = 0.0,
  **decode_kw,
) -> decoding.DecodeOutput:
  """Tokens after prompt [B, P] (left-padded rows: pass `mask` [B, P]) with the model's KV cache (jit-able).

  cache_len: cache slots (default P + max_new_tokens). contrast_inputs: guided decoding
  (decoding.guided_step_fn): a second stream per example whose inputs replace the named ones (e.g.
  {'images': masked images} for contrastive region guidance), its logits mixed as
  l_contrast + guidance * (l - l_contrast), with `plausibility` the adaptive plausibility constraint;
  'greedy' or 'sample' only.
  """
  p, b = prompt.shape[1], prompt.shape[0]
  cache_inputs, prefill_inputs = _present(cache_inputs), _present(prefill_inputs)
  first_prompt, first_mask = prompt, mask
  if contrast_inputs is not None:
    if method not in ("greedy", "sample"):
      raise ValueError(f"guided decoding (contrast_inputs) decodes with 'greedy' or 'sample', not {method!r}")
    unknown = set(contrast_inputs) - set(cache_inputs) - set(prefill_inputs)
    if unknown:
      raise ValueError(f"contrast_inputs {sorted(unknown)} replace no input of this call")

    def two(name: str, x: jax.Array) -> jax.Array:
      return jnp.concatenate([x, contrast_inputs.get(name, x)])

    cache_inputs = {k: two(k, v) for k, v in cache_inputs.items()}
    prefill_inputs = {k: two(k, v) for k, v in prefill_inputs.items()}
    first_prompt = jnp.concatenate([prompt, prompt])
    first_mask = None if mask is None else jnp.concatenate([mask, mask])
  cache = init_cache(
    model, params, first_prompt, cache_len or p + max_new_tokens, first_mask, **cache_inputs, **prefill_inputs
  )
  step = step_fn(model, params, prefill_inputs, p)
  if contrast_inputs is not None:
    cache, step = decoding.guided_step_fn(step, cache, b, guidance, plausibility=plausibility)
  return decoding.generate(
    step,
    cache,
    prompt,
    method=method,
    rng=rng,
    max_new_tokens=max_new_tokens,
    eos_id=eos_id,
    pad_id=pad_id,
    **decode_kw,
  )
