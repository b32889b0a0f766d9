"""VLMo pretraining objectives (Bao et al. 2022, sec. 2.2 and 2.3), one dataclass for all stages.

    L = itc_weight * ITC + itm_weight * ITM + mlm_weight * MLM + mim_weight * MIM

- ITC: the shared all-device contrastive loss (softmax) on the dual-encoder embeddings.
- ITM: the fusion encoder classifies each pair, one hard-negative text and one hard-negative
  image per pair, drawn from the softmax of the ITC similarities over the global batch gathered
  from all devices (vlm.losses.matching), never the pair itself nor a pair with the same text.
- MLM: 15% of the text tokens masked BERT-style, predicted by the fusion encoder with the image
  (mlm_with_image=True, stage 3) or by the text-only encoder (False, stage 2).
- MIM: BEiT masked image modelling on the image-only encoder: ~40% of the patches replaced by
  the mask token, predicting the frozen tokenizer's codes there (stage 1).

Stagewise pretraining (sec. 2.3) is three configs with different weights: MIM only (image
data), MLM only without images (attention and V-FFN frozen), then ITC + ITM + MLM on pairs.
Terms with weight 0 are not computed.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from vlm.losses import (
  blockwise_patch_mask,
  hard_negative_indices,
  itm_loss,
  mask_tokens,
  masked_prediction_loss,
  random_patch_mask,
  take_rows,
)
from vlm.objectives.base import OBJECTIVES, check_choice, check_contrastive
from vlm.objectives.contrastive import contrastive_term


@OBJECTIVES.register("vlmo")
@dataclasses.dataclass(frozen=True)
class VLMoObjective:
  """mask_id: the [MASK] token id (< model.vocab_size; the embedded tokenizer has none, so demos
  use its vocabulary size and give the model one more row). special_ids are never masked (pad,
  eos, bos = the CLS position). mim_masking: 'blockwise' (BEiT) or 'random'.
  """

  itc_weight: float = 1.0
  itm_weight: float = 1.0
  mlm_weight: float = 1.0
  mim_weight: float = 0.0
  mlm_with_image: bool = True
  mask_id: int = 1000
  mask_rate: float = 0.15  # BERT / VLMo sec. 2.2
  special_ids: tuple[int, ...] = (0, 1, 3)
  mim_ratio: float = 0.4  # BEiT sec. 2.2: about 40% of the patches
  mim_masking: str = "blockwise"
  itm_hard_negatives: bool = True
  loss: str = "softmax"
  impl: str = "all_gather"
  mesh: Mesh | None = None

  def __post_init__(self):
    check_choice("mim_masking", self.mim_masking, ("blockwise", "random"))
    check_contrastive(self.loss, self.impl)
    if not any((self.itc_weight, self.itm_weight, self.mlm_weight, self.mim_weight)):
      raise ValueError("objective: every loss weight is 0")

  def init_args(self, batch) -> tuple:
    return (batch["image"][:1], batch["text"][:1])

  def __call__(self, model: nn.Module, params, batch, *, rng, train: bool):
    images, text = batch["image"], batch["text"]
    r_drop, r_neg, r_mlm, r_mim = jax.random.split(rng, 4)

    def apply(method, *args, salt: int = 0):
      return model.apply(
        {"params": params}, *args, train=train, method=method, rngs={"dropout": jax.random.fold_in(r_drop, salt)}
      )

    metrics, total = {}, 0.0
    if self.itc_weight or self.itm_weight:
      zimg, _ = apply(type(model).encode_image, images, salt=1)
      ztxt, _ = apply(type(model).encode_text, text, salt=2)
      scale, bias = model.apply({"params": params}, method=lambda m: m.scale_and_bias())
      if self.itc_weight:
        itc, m = contrastive_term(
          zimg, ztxt, {"scale": scale, "bias": bias}, loss=self.loss, impl=self.impl, mesh=self.mesh
        )
        metrics.update({f"itc/{k}": v for k, v in m.items()}, itc_loss=itc)
        total += self.itc_weight * itc
      if self.itm_weight:
        neg_txt, neg_img = hard_negative_indices(
          zimg, ztxt, r_neg, scale=scale, tokens=text, hard=self.itm_hard_negatives, mesh=self.mesh
        )
        neg_text, neg_images = take_rows(text, neg_txt, self.mesh), take_rows(images, neg_img, self.mesh)
        # Each pair with its negative text and its negative image, [B, 3, ...] -> [3B, ...]: every
        # device keeps its own rows (a concatenation along the batch would reshuffle them).
        b = text.shape[0]
        triple = lambda x, y, z: jnp.stack([x, y, z], axis=1).reshape(3 * b, *x.shape[1:])  # noqa: E731
        logits = apply(
          type(model).itm_logits, triple(images, images, neg_images), triple(text, neg_text, text), salt=3
        ).reshape(b, 3, 2)
        itm, m = itm_loss(logits[:, 0], logits[:, 1:].reshape(2 * b, 2))
        metrics.update({f"itm/{k}": v for k, v in m.items()}, itm_loss=itm)
        total += self.itm_weight * itm
    if self.mlm_weight:
      if self.mask_id >= model.vocab_size:
        raise ValueError(
          f"objective.mask_id={self.mask_id} must be < model.vocab_size={model.vocab_size} "
          "(give the text embedding a row for [MASK])"
        )
      inputs, chosen = mask_tokens(
        r_mlm,
        text,
        mask_id=self.mask_id,
        vocab_size=model.vocab_size,
        rate=self.mask_rate,
        special_ids=self.special_ids,
      )
      logits = apply(type(model).mlm_logits, inputs, images if self.mlm_with_image else None, salt=5)
      mlm, m = masked_prediction_loss(logits, text, chosen)
      metrics.update({f"mlm/{k}": v for k, v in m.items()}, mlm_loss=mlm)
      total += self.mlm_weight * mlm
    if self.mim_weight:
      codes = model.apply({"params": params}, images, method=type(model).image_codes)
      b, n = codes.shape
      if self.mim_masking == "blockwise":
        g = int(round(n**0.5))
        patch_mask = blockwise_patch_mask(r_mim, b, (g, g), self.mim_ratio)
      else:
        patch_mask = random_patch_mask(r_mim, b, n, self.mim_ratio)
      logits = apply(type(model).mim_logits, images, patch_mask, salt=6)
      mim, m = masked_prediction_loss(logits, codes, patch_mask)
      metrics.update({f"mim/{k}": v for k, v in m.items()}, mim_loss=mim)
      total += self.mim_weight * mim
    return total, metrics
