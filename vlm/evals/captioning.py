"""Captioning: generate captions with the KV-cached decoder and score them (BLEU-4, CIDEr).

Works for any captioner with the predict function caption(params, images, *, bos_id, eos_id, pad_id,
max_len, method, rng, **decode_kw) -> vlm.decoding.DecodeOutput (CoCa; early fusion, whose image is
part of the token prompt).
"""

from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np

from vlm import parallel
from vlm.data import get_tokenizer, load_split_numpy
from vlm.data.pipeline import make_source
from vlm.data.sources import to_str
from vlm.evals.base import EVALS, batched_apply, jit_on_mesh
from vlm.evals.caption_metrics import caption_scores
from vlm.models.registry import PredictFns, require


def reference_captions(data_config, split: str, keys: Sequence[str], n: int) -> list[list[str]]:
  """The raw caption strings `keys` of the first n records of `split` (no image decoding)."""
  source = make_source(data_config, split)
  refs = []
  for i in range(min(n, len(source))):
    rec = source[i]
    refs.append([s for s in (to_str(rec.get(k, "")).strip() for k in keys) if s])
  return refs


def caption_fn(
  caption: Callable, mesh, rules, tok, max_len: int, method: str = "greedy", seed: int = 0, **decode_kw
) -> Callable:
  """Jitted fn(params, images [B, H, W, 3]) -> the generated caption tokens of the predict function
  `caption`, for batched_apply."""
  rng = jax.random.key(seed) if method == "sample" else None
  return jit_on_mesh(
    lambda p, x: (
      caption(
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
    data: ml_collections.ConfigDict,
    rules: parallel.Rules,
    predict_fns: PredictFns,
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
    require(predict_fns, ("caption",), f"evals.{prefix}")
    self.data_config, self.caption, self.mesh, self.prefix = data, predict_fns["caption"], mesh, prefix
    self.split, self.batch_size, self.max_examples = split, batch_size, max_examples
    self.reference_keys = tuple(reference_keys)
    self.tok = None
    self.max_len = int(max_len or data.text_length)
    self.method, self.seed, self.decode_kw = method, seed, decode_kw
    self.rules = rules
    self._data = None
    self._generate = None
    self.last_captions: list[str] = []

  def _generate_fn(self):
    """The jitted generation, built once (evaluations every N steps reuse its compilation)."""
    if self._generate is None:
      self._generate = caption_fn(
        self.caption, self.mesh, self.rules, self.tokenizer(), self.max_len, self.method, self.seed, **self.decode_kw
      )
    return self._generate

  def tokenizer(self):
    if self.tok is None:
      self.tok = get_tokenizer(self.data_config)
    return self.tok

  def data(self) -> tuple[np.ndarray, list[list[str]]]:
    """Images (data.pp_eval) and their references, in source order (the embedded set has no bad records)."""
    if self._data is None:  # loaded once, on first use
      arrays, _ = load_split_numpy(self.data_config, self.split, max_examples=self.max_examples)
      refs = reference_captions(self.data_config, self.split, self.reference_keys, len(arrays["image"]))
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
