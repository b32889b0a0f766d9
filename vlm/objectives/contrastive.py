"""Contrastive image-text objective (CLIP softmax / SigLIP sigmoid) for two-tower models and for
models whose pair logits come from a similarity function (Llip: its predict function pair_similarity)."""

import dataclasses

import flax.linen as nn
from jax.sharding import Mesh

from vlm import parallel
from vlm.losses import contrastive_loss, pairwise_contrastive_loss
from vlm.models.registry import predict_fns
from vlm.objectives.base import OBJECTIVES, check_contrastive


@OBJECTIVES.register("contrastive")
@dataclasses.dataclass(frozen=True)
class Contrastive:
  """loss: 'sigmoid' or 'softmax'; impl: 'all_gather' or 'ring' across the mesh's data axes.

  A model with the predict function `pair_similarity` (vlm.models.registry) returns per-example
  pytrees for the two sides, and the loss is `pairwise_contrastive_loss` on pair_similarity(img, txt)
  (the ring passes the text side).
  """

  loss: str = "sigmoid"
  impl: str = "all_gather"
  mesh: Mesh | None = None

  def __post_init__(self):
    check_contrastive(self.loss, self.impl)

  def init_args(self, batch) -> tuple:
    """Example inputs for model.init (one row of the batch)."""
    return (batch["image"][:1], batch["text"][:1])

  def __call__(self, model: nn.Module, params, batch, *, rng, train: bool):
    zimg, ztxt, out = model.apply({"params": params}, batch["image"], batch["text"], train=train, rngs={"dropout": rng})
    sim_fn = predict_fns(model).get("pair_similarity")
    return contrastive_term(zimg, ztxt, out, loss=self.loss, impl=self.impl, mesh=self.mesh, sim_fn=sim_fn)


def contrastive_term(zimg, ztxt, out: dict, *, loss: str, impl: str, mesh: Mesh | None, sim_fn=None):
  """The shared contrastive loss on a model's embeddings and out['scale'] / out['bias'] (all devices).

  sim_fn: pair similarity sim(zimg, ztxt) -> [I, J] of pytree sides (None: dot products).
  Returns (loss, metrics) with the loss's pos/neg logits, the scale and the bias.
  """
  axes = parallel.data_axes(mesh)
  impl = impl if mesh is not None else "local"
  if sim_fn is None:
    value, metrics = contrastive_loss(zimg, ztxt, out["scale"], out["bias"], kind=loss, impl=impl, mesh=mesh, axes=axes)
  else:
    value, metrics = pairwise_contrastive_loss(
      zimg, ztxt, sim_fn, out["scale"], out["bias"], kind=loss, impl=impl, mesh=mesh, axes=axes
    )
  metrics = dict(metrics, scale=out["scale"])
  if out["bias"] is not None:
    metrics["bias"] = out["bias"]
  return value, metrics
