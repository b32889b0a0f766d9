"""Mixed-modal next-token objective of early-fusion models (Chameleon, vlm.models.early_fusion)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from vlm.losses import caption_loss
from vlm.objectives.base import OBJECTIVES


@OBJECTIVES.register("early_fusion")
@dataclasses.dataclass(frozen=True)
class EarlyFusion:
  """Next-token cross-entropy over whole mixed-modal rows, image codes and text alike.

  image_first_prob: chance that a row is [image, caption] (captioning) rather than [caption, image]
    (text-to-image); Chameleon trains on both directions of its image-text pairs.
  z_loss: weight of log(Z)^2 on every token; 1e-5 is Chameleon's (sec. 2.3), against the logit
    drift it reports for mixed-modal training.
  image_weight: weight of the image-code tokens relative to the text tokens (1: plain token mean).
  Metrics: loss, text_loss / image_loss and text_accuracy / image_accuracy (per-token means).
  """

  image_first_prob: float = 0.5
  z_loss: float = 1e-5
  image_weight: float = 1.0
  mesh: Mesh | None = None

  def init_args(self, batch) -> tuple:
    return (batch["image"][:1], batch["text"][:1])

  def __call__(self, model: nn.Module, params, batch, *, rng, train: bool):
    order_rng, dropout_rng = jax.random.split(rng)
    b = batch["image"].shape[0]
    image_first = jax.random.bernoulli(order_rng, self.image_first_prob, (b,))
    logits, tokens, mask = model.apply(
      {"params": params}, batch["image"], batch["text"], image_first, train=train, rngs={"dropout": dropout_rng}
    )
    logits, targets, mask = logits[:, :-1], tokens[:, 1:], mask[:, 1:]
    is_image = model.is_image_token(targets)
    text_mask, image_mask = mask & ~is_image, mask & is_image
    text_loss, text_m = caption_loss(logits, targets, text_mask, z_loss=self.z_loss)
    image_loss, image_m = caption_loss(logits, targets, image_mask, z_loss=self.z_loss)
    n_text, n_image = text_mask.sum(), image_mask.sum()
    loss = (n_text * text_loss + self.image_weight * n_image * image_loss) / jnp.maximum(n_text + n_image, 1)
    return loss, {
      "text_loss": text_loss,
      "image_loss": image_loss,
      "text_accuracy": text_m["token_accuracy"],
      "image_accuracy": image_m["token_accuracy"],
      "log_z": text_m["log_z"],
    }
