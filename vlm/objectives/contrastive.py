"""Contrastive image-text objective for two-tower models (CLIP softmax / SigLIP sigmoid)."""

import dataclasses

import flax.linen as nn
from jax.sharding import Mesh

from vlm import parallel
from vlm.losses import contrastive_loss
from vlm.objectives.base import OBJECTIVES


@OBJECTIVES.register("contrastive")
@dataclasses.dataclass(frozen=True)
class Contrastive:
  """loss: 'sigmoid' or 'softmax'; impl: 'all_gather' or 'ring' across the mesh's data axes."""

  loss: str = "sigmoid"
  impl: str = "all_gather"
  mesh: Mesh | None = None

  def init_args(self, batch) -> tuple:
    """Example inputs for model.init (one row of the batch)."""
    return (batch["image"][:1], batch["text"][:1])

  def __call__(self, model: nn.Module, params, batch, *, rng, train: bool):
    zimg, ztxt, out = model.apply({"params": params}, batch["image"], batch["text"], train=train,
                                  rngs={"dropout": rng})
    return contrastive_term(zimg, ztxt, out, loss=self.loss, impl=self.impl, mesh=self.mesh)


def contrastive_term(zimg, ztxt, out: dict, *, loss: str, impl: str, mesh: Mesh | None):
  """The shared contrastive loss on a model's embeddings and out['scale'] / out['bias'] (all devices).

  Returns (loss, metrics) with the loss's pos/neg logits, the scale and the bias.
  """
  axes = parallel.data_axes(mesh) if mesh is not None else ()
  value, metrics = contrastive_loss(zimg, ztxt, out["scale"], out["bias"], kind=loss,
                                    impl=impl if mesh is not None else "local", mesh=mesh, axes=axes)
  metrics = dict(metrics, scale=out["scale"])
  if out["bias"] is not None:
    metrics["bias"] = out["bias"]
  return value, metrics
