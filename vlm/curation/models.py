"""Trained models as curation tools: a contrastive scorer and a captioner, batched on their mesh."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from vlm import parallel
from vlm.data import get_tokenizer
from vlm.data.preprocess import eval_images
from vlm.evals.base import batched_apply
from vlm.evals.captioning import caption_fn
from vlm.evals.contrastive import encoders
from vlm.models.registry import predict_fns


def _load(workdir: str | Path):
  from vlm.load import load_model_and_params, load_workdir_config

  config = load_workdir_config(workdir)
  model, mesh, params = load_model_and_params(config, workdir)
  return config, model, mesh, params


class ContrastiveScorer:
  """Image-text scores of a trained contrastive workdir (SigLIP, CLIP, LiT, CoCa, Llip).

  score = the model's image-text similarity of each pair: the cosine of the two embeddings for a
  two-tower model (CLIP-score, DataComp sec. 3.4), the caption-conditioned similarity for Llip.
  Images go through the workdir's `data.pp_eval`, captions through its tokenizer.
  """

  def __init__(self, workdir: str | Path, batch_size: int = 256):
    config, self.model, self.mesh, self.params = _load(workdir)
    fns = predict_fns(self.model)
    if "embed_text" not in fns:
      raise ValueError(f"{workdir}: model {config.model_name!r} is not a contrastive model (no embed_text)")
    self.data, self.batch_size = config.data, batch_size
    self.tok = get_tokenizer(config.data)
    self.enc_image, self.enc_text, self.pair_sim = encoders(
      fns, self.mesh, config.get("rules", parallel.DEFAULT_RULES), f"{workdir}"
    )

  def __call__(self, images: Sequence[np.ndarray], captions: Sequence[str]) -> dict[str, np.ndarray]:
    """{'score': [N], 'image_embedding': [N, D] (flattened for pytree sides)} for N pairs."""
    x = eval_images(images, self.data.pp_eval)
    ids = self.tok.encode_batch(list(captions), int(self.data.text_length), self.data.add_bos, self.data.add_eos)
    zi = batched_apply(self.enc_image, self.params, x, self.mesh, self.batch_size)
    zt = batched_apply(self.enc_text, self.params, ids, self.mesh, self.batch_size)
    if self.pair_sim is None:
      score = np.sum(zi * zt, axis=-1)
    else:  # the diagonal of the [n, n] pair scores, in blocks of 64
      score = np.concatenate(
        [
          np.diag(
            np.asarray(
              self.pair_sim(
                self.params, (jax.tree.map(lambda a: a[s : s + 64], zi), jax.tree.map(lambda a: a[s : s + 64], zt))
              )
            )
          )
          for s in range(0, len(x), 64)
        ]
      )
    flat = np.concatenate([np.asarray(a, np.float32).reshape(len(x), -1) for a in jax.tree.leaves(zi)], -1)
    return {"score": score.astype(np.float32), "image_embedding": flat}


class Captioner:
  """Synthetic captions from a trained captioning workdir (any model with the predict function
  `caption`: CoCa, early fusion), greedy by default."""

  def __init__(self, workdir: str | Path, method: str = "greedy", batch_size: int = 256, seed: int = 0, **decode_kw):
    config, self.model, self.mesh, self.params = _load(workdir)
    fns = predict_fns(self.model)
    if "caption" not in fns:
      raise ValueError(f"{workdir}: model {config.model_name!r} does not caption")
    self.data, self.batch_size = config.data, batch_size
    self.tok = get_tokenizer(config.data)
    self.generate = caption_fn(
      fns["caption"],
      self.mesh,
      config.get("rules", parallel.DEFAULT_RULES),
      self.tok,
      int(config.data.text_length),
      method,
      seed,
      **decode_kw,
    )

  def __call__(self, images: Sequence[np.ndarray]) -> list[str]:
    x = eval_images(images, self.data.pp_eval)
    return self.tok.decode_batch(batched_apply(self.generate, self.params, x, self.mesh, self.batch_size))
