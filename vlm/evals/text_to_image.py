"""Text-to-image evaluation of early-fusion models: do generated images show what the prompt says?

For each test example the model generates the image tokens after [BOS, caption, BOI]; the VQ
tokenizer renders them; a separately trained contrastive model (the "judge": a SigLIP, CLIP or
Llip run, given by its workdir) classifies the result zero-shot among the split's "<colour>
<shape>" classes. Reported, as fractions of examples:

  match: colour and shape both right; colour, shape: each alone
  match_seen / match_unseen: on combinations seen / held out in training
  judge_real: the judge on the real test images (its own ceiling)
  judge_recon: the judge on the tokenizer's reconstructions of them (the image tokens' ceiling)
"""

from typing import Any

import jax
import ml_collections
import numpy as np

from vlm import parallel
from vlm.evals.base import EVALS, SplitData, batched_apply, jit_on_mesh
from vlm.evals.contrastive import ZeroShot
from vlm.load import load_model_and_params, load_workdir_config
from vlm.models.registry import PredictFns, require
from vlm.models.registry import predict_fns as predict_fns_of


@EVALS.register("text_to_image")
class TextToImage(SplitData):
  """judge: workdir of a trained contrastive run (its config and latest checkpoint are loaded).
  method / decode_kw: vlm.decoding's ('greedy', or 'sample' with temperature / top_k / top_p).
  guidance: classifier-free guidance scale (1: none; the predict function generate_images).
  caption_key: the prompts' field (default: data.caption_key's canonical 'caption')."""

  def __init__(
    self,
    *,
    data: ml_collections.ConfigDict,
    rules: parallel.Rules,
    predict_fns: PredictFns,
    mesh,
    prefix: str,
    judge: str,
    split: str = "test",
    batch_size: int = 256,
    max_examples: int | None = 512,
    method: str = "greedy",
    seed: int = 0,
    caption_key: str = "caption",
    guidance: float = 1.0,
    **decode_kw,
  ):
    require(predict_fns, ("generate_images", "reconstruct"), f"evals.{prefix}")
    self.predict_fns, self.mesh, self.prefix = predict_fns, mesh, prefix
    self.split, self.batch_size, self.max_examples = split, batch_size, max_examples
    self.method, self.seed, self.guidance, self.decode_kw = method, seed, guidance, decode_kw
    self.data_config = ml_collections.ConfigDict(data.to_dict())
    self.data_config.caption_key = caption_key
    self.rules = rules
    try:
      judge_config = load_workdir_config(judge)
    except FileNotFoundError as e:
      raise FileNotFoundError(
        f"evals.{prefix}.judge={judge!r}: no trained contrastive run there ({e}); train "
        "one first, e.g. configs/llip_b16.py:demo"
      ) from e
    self.judge_model, _, self.judge_params = load_model_and_params(judge_config, judge, None)
    self.judge = ZeroShot(
      data=judge_config.data,
      rules=judge_config.get("rules", parallel.DEFAULT_RULES),
      predict_fns=predict_fns_of(self.judge_model),
      mesh=mesh,
      prefix="judge",
      split=split,
      batch_size=batch_size,
      max_examples=max_examples,
    )
    self._generate = None
    self._recon = None
    self._zcls = None  # the judge's class embeddings and its accuracy on the real images: fixed
    self._judge_real = None
    self.last_images: np.ndarray | None = None

  def _fns(self, image_hw: tuple[int, int]):
    if self._generate is None:
      rng = jax.random.key(self.seed) if self.method == "sample" else None
      generate = self.predict_fns["generate_images"]
      self._generate = jit_on_mesh(
        lambda p, t: generate(p, t, image_hw, method=self.method, rng=rng, guidance=self.guidance, **self.decode_kw)[1],
        self.mesh,
        self.rules,
      )
      self._recon = jit_on_mesh(self.predict_fns["reconstruct"], self.mesh, self.rules)
    return self._generate, self._recon

  def judge_labels(self, images: np.ndarray) -> np.ndarray:
    """The judge's zero-shot class of each image [N, H, W, 3] (value range of data.pp_eval)."""
    if self._zcls is None:
      meta = self.judge.data()[1]
      templates = list(meta.get("templates") or ["{}"])
      self._zcls = self.judge.class_embeddings(self.judge_params, list(meta["class_names"]), templates)
    zimg = batched_apply(self.judge.enc_image, self.judge_params, images, self.mesh, self.batch_size)
    return np.argmax(self.judge.scores(self.judge_params, zimg, self._zcls), axis=-1)

  def __call__(self, params) -> dict[str, float]:
    arrays = self.data()[0]
    generate, recon = self._fns(tuple(arrays["image"].shape[1:3]))
    generated = batched_apply(generate, params, arrays["text"], self.mesh, self.batch_size)
    self.last_images = generated
    names = list(self.judge.data()[1]["class_names"])
    colour = np.array([n.split(" ", 1)[0] for n in names])
    shape = np.array([n.split(" ", 1)[1] for n in names])
    label = arrays["label"]
    pred = self.judge_labels(np.clip(generated, -1.0, 1.0))
    out: dict[str, Any] = {
      "match": pred == label,
      "colour": colour[pred] == colour[label],
      "shape": shape[pred] == shape[label],
    }
    res = {f"{self.prefix}/{k}": float(v.mean()) for k, v in out.items()}
    if "seen" in arrays:
      seen = arrays["seen"].astype(bool)
      for name, rows in (("seen", seen), ("unseen", ~seen)):
        if rows.any():
          res[f"{self.prefix}/match_{name}"] = float(out["match"][rows].mean())
    if self._judge_real is None:
      self._judge_real = float((self.judge_labels(arrays["image"]) == label).mean())
    res[f"{self.prefix}/judge_real"] = self._judge_real
    recon_images = batched_apply(recon, params, arrays["image"], self.mesh, self.batch_size)
    res[f"{self.prefix}/judge_recon"] = float((self.judge_labels(np.clip(recon_images, -1, 1)) == label).mean())
    return res
