"""Captioning: generate captions with the KV-cached decoder and score them (BLEU-4, CIDEr).

Works for any captioner with two methods: `caption_context(images) -> context` and
`decode_step(tokens [B, T], index, context=None, cache_len=None) -> logits [B, T, V]` (CoCa), or
`caption_prompt(images) -> prompt [B, P]` and `decode_step(tokens, index, cache_len=None)` (early
fusion: the image is part of the token prompt, vlm.models.early_fusion).
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm import decoding, parallel
from vlm.data import get_tokenizer, load_split_numpy
from vlm.data.pipeline import make_source
from vlm.data.sources import to_str
from vlm.evals.base import EVALS, batched_apply, jit_on_mesh
from vlm.evals.caption_metrics import caption_scores


def generate_captions(
  model: nn.Module,
  params: Any,
  images: jax.Array,
  *,
  bos_id: int,
  eos_id: int,
  pad_id: int,
  max_len: int,
  method: str = "greedy",
  rng: jax.Array | None = None,
  **decode_kw,
) -> decoding.DecodeOutput:
  """Captions for images [B, H, W, 3]: prompt [BOS], then up to max_len - 1 tokens (jit-able).

  The cache is created by one decode_step on the BOS token with the image context (which also
  projects the cross-attention keys once); the generic decoder then prefills from slot 0.
  """
  if hasattr(model, "caption_prompt"):  # early fusion: [BOS, image tokens] is the prompt
    prompt = model.apply({"params": params}, images, method=model.caption_prompt)
    _, variables = model.apply(
      {"params": params}, prompt, 0, prompt.shape[1] + max_len, method=model.decode_step, mutable=["cache"]
    )
  else:
    context = model.apply({"params": params}, images, method=model.caption_context)
    prompt = jnp.full((images.shape[0], 1), bos_id, jnp.int32)
    _, variables = model.apply(
      {"params": params}, prompt, 0, context, max_len, method=model.decode_step, mutable=["cache"]
    )

  def step_fn(cache, tokens, index):
    logits, new = model.apply(
      {"params": params, "cache": cache}, tokens, index, method=model.decode_step, mutable=["cache"]
    )
    return logits.astype(jnp.float32), new["cache"]

  return decoding.generate(
    step_fn,
    variables["cache"],
    prompt,
    method=method,
    rng=rng,
    max_new_tokens=max_len - 1,
    eos_id=eos_id,
    pad_id=pad_id,
    **decode_kw,
  )


def reference_captions(data_config, split: str, keys: Sequence[str], n: int) -> list[list[str]]:
  """The raw caption strings `keys` of the first n records of `split` (no image decoding)."""
  source = make_source(data_config, split)
  refs = []
  for i in range(min(n, len(source))):
    rec = source[i]
    refs.append([s for s in (to_str(rec.get(k, "")).strip() for k in keys) if s])
  return refs


def caption_fn(
  model: nn.Module, mesh, rules, tok, max_len: int, method: str = "greedy", seed: int = 0, **decode_kw
) -> Callable:
  """Jitted fn(params, images [B, H, W, 3]) -> caption tokens [B, max_len], for batched_apply."""
  rng = jax.random.key(seed) if method == "sample" else None
  return jit_on_mesh(
    lambda p, x: (
      generate_captions(
        model,
        p,
        x,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        max_len=max_len,
        method=method,
        rng=rng,
        **decode_kw,
      ).tokens
    ),
    mesh,
    rules,
  )


@EVALS.register("captioning")
class Captioning:
  """BLEU-1/4 and CIDEr-D of generated captions against a split's reference captions.

  method: 'greedy' | 'beam' | 'sample' (vlm.decoding), with decode_kw (num_beams, top_k, ...).
  reference_keys: record fields used as references (several per image).
  max_len: decoded length including BOS (default: data.text_length).
  Reports {prefix}/bleu4, /bleu1, /cider, /exact_match (the caption equals one of its references,
  case and surrounding spaces ignored) and keeps the last captions in `self.last_captions`.
  """

  def __init__(
    self,
    *,
    config,
    model,
    mesh,
    prefix: str,
    split: str = "test",
    batch_size: int = 256,
    max_examples: int | None = None,
    method: str = "greedy",
    reference_keys: Sequence[str] = ("caption",),
    max_len: int | None = None,
    seed: int = 0,
    **decode_kw,
  ):
    self.config, self.model, self.mesh, self.prefix = config, model, mesh, prefix
    self.split, self.batch_size, self.max_examples = split, batch_size, max_examples
    self.reference_keys = tuple(reference_keys)
    self.tok = None
    self.max_len = int(max_len or config.data.text_length)
    self.method, self.seed, self.decode_kw = method, seed, decode_kw
    self.rules = config.get("rules", parallel.DEFAULT_RULES)
    self._data = None
    self._generate = None
    self.last_captions: list[str] = []

  def _generate_fn(self):
    """The jitted generation, built once (evaluations every N steps reuse its compilation)."""
    if self._generate is None:
      self._generate = caption_fn(
        self.model, self.mesh, self.rules, self.tokenizer(), self.max_len, self.method, self.seed, **self.decode_kw
      )
    return self._generate

  def tokenizer(self):
    if self.tok is None:
      self.tok = get_tokenizer(self.config.data)
    return self.tok

  def data(self) -> tuple[np.ndarray, list[list[str]]]:
    """Images (data.pp_eval) and their references, in source order (the embedded set has no bad records)."""
    if self._data is None:  # loaded once, on first use
      arrays, _ = load_split_numpy(self.config.data, self.split, max_examples=self.max_examples)
      refs = reference_captions(self.config.data, self.split, self.reference_keys, len(arrays["image"]))
      self._data = (arrays["image"], refs)
    return self._data

  def captions(self, params, images: np.ndarray) -> list[str]:
    tokens = batched_apply(self._generate_fn(), params, images, self.mesh, self.batch_size)
    return self.tokenizer().decode_batch(tokens)

  def __call__(self, params) -> dict[str, float]:
    images, refs = self.data()
    self.last_captions = self.captions(params, images)
    scores = caption_scores(self.last_captions, refs)
    scores["exact_match"] = float(
      np.mean([c.strip().lower() in {r.strip().lower() for r in rs} for c, rs in zip(self.last_captions, refs)])
    )
    return {f"{self.prefix}/{k}": float(v) for k, v in scores.items()}
