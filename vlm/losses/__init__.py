"""Losses shared by the model families."""

from vlm.losses.captioning import caption_loss
from vlm.losses.contrastive import (
  IMPLS,
  KINDS,
  LOSSES,
  all_gather_batch,
  contrastive_loss,
  contrastive_metrics,
  get_loss_fn,
  pairwise_contrastive_loss,
  sigmoid_loss,
  softmax_loss,
)
from vlm.losses.masking import blockwise_patch_mask, mask_tokens, masked_prediction_loss, random_patch_mask
from vlm.losses.matching import hard_negative_indices, itm_loss, take_rows

__all__ = [
  "IMPLS",
  "KINDS",
  "LOSSES",
  "all_gather_batch",
  "blockwise_patch_mask",
  "caption_loss",
  "contrastive_loss",
  "contrastive_metrics",
  "get_loss_fn",
  "hard_negative_indices",
  "itm_loss",
  "mask_tokens",
  "pairwise_contrastive_loss",
  "masked_prediction_loss",
  "random_patch_mask",
  "sigmoid_loss",
  "softmax_loss",
  "take_rows",
]
