"""Zero-shot classification (prompt ensembling) and image-text retrieval for contrastive models.

The predict functions embed_image / embed_text give the two sides; without a pair_similarity they
are embeddings scored by dot products, with one (Llip) they are pytrees and every (image, text) pair
is scored by it, so zero-shot and retrieval use its caption-conditioned image embeddings.
"""

from collections.abc import Callable

import jax

import ml_collections
import numpy as np
from jax.sharding import Mesh

from vlm import parallel
from vlm.data import get_tokenizer
from vlm.evals.base import EVALS, SplitData, batched_apply, jit_on_mesh
from vlm.models.registry import PredictFns, require


def encoders(predict_fns: PredictFns, mesh: Mesh, rules, where: str) -> tuple[Callable, Callable, Callable | None]:
  """Jitted (image encoder, text encoder, pair similarity or None) from a contrastive model's predict
  functions, each fn(params, x) for batched_apply; the pair similarity takes x = (image side, text
  side). where: the caller, named in the error when embed_image / embed_text are missing."""
  require(predict_fns, ("embed_image", "embed_text"), where)
  pair_sim = None
  if "pair_similarity" in predict_fns:
    sim_fn = predict_fns["pair_similarity"]
    pair_sim = jit_on_mesh(lambda _, it: sim_fn(*it), mesh, rules)
  embed_image, embed_text = predict_fns["embed_image"], predict_fns["embed_text"]
  return jit_on_mesh(embed_image, mesh, rules), jit_on_mesh(embed_text, mesh, rules), pair_sim


class _Base(SplitData):
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
    caption_key: str | None = None,
  ):
    """caption_key: evaluate on this caption field instead of `data.caption_key`."""
    self.mesh, self.prefix = mesh, prefix
    self.data_config = data
    if caption_key:
      self.data_config = ml_collections.ConfigDict(data.to_dict())
      self.data_config.caption_key = caption_key
    self.split, self.batch_size, self.max_examples = split, batch_size, max_examples
    self.enc_image, self.enc_text, self.pair_sim = encoders(predict_fns, mesh, rules, f"evals.{prefix}")

  def scores(self, params, zimg, ztxt, chunk: int = 64) -> np.ndarray:
    """[N, M] scores of N images against M texts (embeddings or pytree sides)."""
    if self.pair_sim is None:
      return similarity(zimg, ztxt)
    n = len(jax.tree.leaves(zimg)[0])
    return np.concatenate(
      [
        np.asarray(self.pair_sim(params, (jax.tree.map(lambda x: x[i : i + chunk], zimg), ztxt)))
        for i in range(0, n, chunk)
      ]
    )

  def image_embeddings(self, params) -> np.ndarray:
    return batched_apply(self.enc_image, params, self.data()[0]["image"], self.mesh, self.batch_size)

  def text_embeddings(self, params, tokens: np.ndarray) -> np.ndarray:
    return batched_apply(self.enc_text, params, tokens, self.mesh, self.batch_size)


@EVALS.register("zeroshot")
class ZeroShot(_Base):
  """Top-1 of argmax_c <z_img, mean_t z_txt(template_t(class_c))> (CLIP sec. 3.1.4 prompt ensembling).

  Reports top1 overall and on seen / held-out attribute combinations when the split has `seen`.
  """

  def __init__(self, *, templates: tuple[str, ...] | None = None, **kw):
    super().__init__(**kw)
    self.templates = templates

  def class_embeddings(self, params, class_names: list[str], templates: list[str]) -> np.ndarray:
    tok = get_tokenizer(self.data_config)
    texts = [t.format(c) for c in class_names for t in templates]
    ids = tok.encode_batch(texts, self.data_config.text_length, self.data_config.add_bos, self.data_config.add_eos)
    z = jax.tree.map(
      lambda x: x.reshape(len(class_names), len(templates), *x.shape[1:]).mean(1), self.text_embeddings(params, ids)
    )
    if isinstance(z, np.ndarray):
      return z / np.linalg.norm(z, axis=-1, keepdims=True)
    return z  # pytree sides (Llip: mean query and caption embedding over the templates)

  def __call__(self, params) -> dict[str, float]:
    arrays, meta = self.data()
    templates = list(self.templates or meta.get("templates") or ["{}"])
    zcls = self.class_embeddings(params, list(meta["class_names"]), templates)
    pred = np.argmax(self.scores(params, self.image_embeddings(params), zcls), axis=-1)
    correct = pred == arrays["label"]
    out = {f"{self.prefix}/top1": float(correct.mean())}
    if "seen" in arrays:
      seen = arrays["seen"].astype(bool)
      if seen.any():
        out[f"{self.prefix}/top1_seen"] = float(correct[seen].mean())
      if (~seen).any():
        out[f"{self.prefix}/top1_unseen"] = float(correct[~seen].mean())
        out[f"{self.prefix}/chance"] = 1.0 / len(meta["class_names"])
    return out


def similarity(zimg: np.ndarray, ztxt: np.ndarray) -> np.ndarray:
  """Scores [N, M] of image embeddings [N, E] (or [N, Q, E]: several per image, scored by their
  maximum, BLIP-2's max over queries) against text embeddings [M, E]."""
  sim = zimg @ ztxt.T
  return sim.max(axis=1) if zimg.ndim == 3 else sim


def recall_at_k(sim: np.ndarray, relevant: np.ndarray, ks=(1, 5, 10)) -> dict[int, float]:
  """sim [Q, N] scores, relevant [Q, N] bool -> {k: fraction of queries with a relevant item in the top k}."""
  order = np.argsort(-sim, axis=1, kind="stable")
  hits = np.take_along_axis(relevant, order, axis=1)
  return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


@EVALS.register("retrieval")
class Retrieval(_Base):
  """Image->text and text->image recall@{1,5,10} over a split's (image, caption) pairs.

  Identical captions (same token ids) are one gallery item, relevant to every image they
  describe: the embedded dataset's short captions repeat, and ties between identical texts
  would otherwise make R@1 depend on sort order.
  """

  def __call__(self, params) -> dict[str, float]:
    arrays, _ = self.data()
    uniq, inverse = np.unique(arrays["text"], axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    zimg = self.image_embeddings(params)
    ztxt = self.text_embeddings(params, uniq)
    sim = self.scores(params, zimg, ztxt)  # [images, unique captions]
    relevant = inverse[:, None] == np.arange(len(uniq))[None, :]
    i2t = recall_at_k(sim, relevant)
    t2i = recall_at_k(sim.T, relevant.T)
    out = {f"{self.prefix}/i2t_r{k}": v for k, v in i2t.items()}
    out.update({f"{self.prefix}/t2i_r{k}": v for k, v in t2i.items()})
    return out
