"""Reconstruction quality and codebook use of an image tokenizer (vlm.models.vq.VQTokenizer) on a split."""

import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm import parallel
from vlm.evals.base import EVALS, SplitData, batched_apply, jit_on_mesh
from vlm.models.registry import PredictFns, require


@EVALS.register("reconstruction")
class Reconstruction(SplitData):
  """Images of `split` (data.pp_eval, in [-1, 1]) through the predict function autoencode(params,
  images) -> (recon, codes) of an image tokenizer (and its codebook_size()).

  Reports {prefix}/mse (per-pixel, averaged over images), {prefix}/psnr (mean over images of
  10 log10(2^2 / mse_i): peak-to-peak 2 for [-1, 1]), {prefix}/usage (fraction of the codebook
  that occurs over the whole split) and {prefix}/perplexity (exp entropy of the split's code
  histogram; at most codebook_size).
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
    image_key: str = "image",
  ):
    self.prefix, self.mesh, self.split = prefix, mesh, split
    self.batch_size, self.max_examples, self.image_key = batch_size, max_examples, image_key
    self.data_config = data
    require(predict_fns, ("autoencode", "codebook_size"), f"evals.{prefix}")
    self.codebook_size = int(predict_fns["codebook_size"]())
    autoencode = predict_fns["autoencode"]

    def per_image(params, images):
      recon, codes = autoencode(params, images)
      mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - images.astype(jnp.float32)), axis=(1, 2, 3))
      return mse, codes.reshape(images.shape[0], -1)

    self.apply = jit_on_mesh(per_image, mesh, rules)

  def __call__(self, params) -> dict[str, float]:
    arrays, _ = self.data()
    mse, codes = batched_apply(self.apply, params, arrays[self.image_key], self.mesh, self.batch_size)
    mse, codes = mse.astype(np.float64), codes.astype(np.int64)
    counts = np.bincount(codes.reshape(-1), minlength=self.codebook_size)
    probs = counts[counts > 0] / counts.sum()
    psnr = 10.0 * np.log10(4.0 / np.maximum(mse, 1e-10))
    return {
      f"{self.prefix}/mse": float(mse.mean()),
      f"{self.prefix}/psnr": float(psnr.mean()),
      f"{self.prefix}/usage": float((counts > 0).mean()),
      f"{self.prefix}/perplexity": float(np.exp(-np.sum(probs * np.log(probs)))),
    }
