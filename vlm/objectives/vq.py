"""VQ-VAE loss (van den Oord et al. 2017, eq. 3) for vlm.models.vq.VQTokenizer.

  loss = mean (recon - x)^2 + codebook_weight * mean (sg(z) - q)^2 + commitment * mean (z - sg(q))^2

with beta = commitment = 0.25 as in the paper (ViT-VQGAN keeps it). Reconstruction is the
per-pixel MSE on images in [-1, 1]. entropy_weight > 0 adds entropy_loss (below), which keeps
the codebook in use where the codes would otherwise collapse onto a few entries. Also reports
the batch's code perplexity and codebook usage.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from vlm.objectives.base import OBJECTIVES


def code_stats(codes: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
  """perplexity = exp(entropy of the code histogram) and usage = fraction of the codebook that occurs."""
  counts = jnp.zeros((codebook_size,), jnp.float32).at[codes.reshape(-1)].add(1.0)
  probs = counts / jnp.maximum(counts.sum(), 1.0)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
  return {"perplexity": jnp.exp(entropy), "usage": jnp.mean((counts > 0).astype(jnp.float32))}


def entropy_loss(similarity: jax.Array, temperature: float) -> jax.Array:
  """mean_i H(p_i) - H(mean_i p_i), p_i = softmax(similarity_i / temperature) over the codebook.

  Low when every token is confident (first term) and the batch spreads over many codes (second
  term): the codebook-usage regulariser of MaskGIT / MAGVIT-v2 (Yu et al. 2024, sec. 3.1).
  """
  logits = similarity.reshape(-1, similarity.shape[-1]).astype(jnp.float32) / temperature
  logp = jax.nn.log_softmax(logits, axis=-1)
  p = jnp.exp(logp)
  per_token = -jnp.mean(jnp.sum(p * logp, axis=-1))
  avg = jnp.mean(p, axis=0)
  batch = -jnp.sum(avg * jnp.log(jnp.maximum(avg, 1e-12)))
  return per_token - batch


@OBJECTIVES.register("vq")
@dataclasses.dataclass(frozen=True)
class VQ:
  """Reconstruction MSE plus the codebook and commitment terms of a VQTokenizer(batch[image_key]).

  Metrics: recon_mse, codebook_loss, commit_loss, perplexity and usage (of the batch's codes).
  """

  image_key: str = "image"
  codebook_weight: float = 1.0
  commitment: float = 0.25
  entropy_weight: float = 0.0
  entropy_temperature: float = 0.01
  mesh: Mesh | None = None

  def init_args(self, batch) -> tuple:
    """Example inputs for model.init (one row of the batch)."""
    return (batch[self.image_key][:1],)

  def __call__(self, model: nn.Module, params, batch, *, rng, train: bool):
    images = batch[self.image_key]
    recon, aux = model.apply({"params": params}, images, train=train, rngs={"dropout": rng})
    recon_mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - images.astype(jnp.float32)))
    loss = recon_mse + self.codebook_weight * aux["codebook_loss"] + self.commitment * aux["commit_loss"]
    if self.entropy_weight:
      ent = entropy_loss(aux["similarity"], self.entropy_temperature)
      loss = loss + self.entropy_weight * ent
    metrics = {"recon_mse": recon_mse, "codebook_loss": aux["codebook_loss"], "commit_loss": aux["commit_loss"]}
    metrics.update(code_stats(aux["codes"], model.codebook_size))
    return loss, metrics
