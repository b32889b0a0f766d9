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
    sigmoid_loss,
    softmax_loss,
)

__all__ = [
    "IMPLS",
    "KINDS",
    "LOSSES",
    "all_gather_batch",
    "caption_loss",
    "contrastive_loss",
    "contrastive_metrics",
    "get_loss_fn",
    "sigmoid_loss",
    "softmax_loss",
]
