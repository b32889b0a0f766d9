"""CoCa objective: contrastive loss + captioning loss (Yu et al. 2022, sec. 3.2, eq. 4)."""

import dataclasses

import flax.linen as nn
from jax.sharding import Mesh

from vlm.losses import caption_loss
from vlm.objectives.base import OBJECTIVES, check_contrastive
from vlm.objectives.contrastive import contrastive_term


@OBJECTIVES.register("coca")
@dataclasses.dataclass(frozen=True)
class CoCaObjective:
  """L = contrastive_weight * L_Con + caption_weight * L_Cap.

  Defaults are the paper's lambda_Con = 1.0, lambda_Cap = 2.0 (sec. 4.1). L_Con is the shared
  contrastive loss over all data devices (loss 'softmax' as in the paper, or 'sigmoid'); L_Cap is
  next-token cross-entropy of the multimodal decoder on batch['text'] = [BOS, w1, .., EOS, pad..],
  position t predicting token t+1, padding ignored.
  """

  contrastive_weight: float = 1.0
  caption_weight: float = 2.0
  loss: str = "softmax"
  impl: str = "all_gather"
  pad_id: int = 0
  label_smoothing: float = 0.0
  mesh: Mesh | None = None

  def __post_init__(self):
    check_contrastive(self.loss, self.impl)

  def init_args(self, batch) -> tuple:
    return (batch["image"][:1], batch["text"][:1])

  def __call__(self, model: nn.Module, params, batch, *, rng, train: bool):
    text = batch["text"]
    zimg, ztxt, out = model.apply({"params": params}, batch["image"], text, train=train, rngs={"dropout": rng})
    con, metrics = contrastive_term(zimg, ztxt, out, loss=self.loss, impl=self.impl, mesh=self.mesh)
    targets = text[:, 1:]
    cap, cap_metrics = caption_loss(
      out["logits"][:, :-1], targets, targets != self.pad_id, label_smoothing=self.label_smoothing
    )
    metrics.update(cap_metrics, contrastive_loss=con, caption_loss=cap)
    return self.contrastive_weight * con + self.caption_weight * cap, metrics
