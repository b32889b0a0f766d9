"""BLIP-2 stage-1 objective (Li et al. 2023, sec. 3.2): ITC + ITM + ITG, weights 1 / 1 / 1.

- ITC: sim(i, t) = max_q <z_img[i, q], z_txt[t]> (z L2-normalised, Q queries per image) times the
  learned scale 1 / temperature; symmetric softmax cross-entropy over the GLOBAL batch: inside
  `jax.shard_map` each device gathers every device's embeddings and scores its own rows [b, B] in
  both directions (as vlm.losses.contrastive's all-gather softmax loss). Label smoothing 0.1 as
  in LAVIS' blip2_qformer.py.
- ITM: the bidirectional Q-Former pass classifies each pair, one hard-negative text and one
  hard-negative image per pair, drawn from the softmax of the ITC similarities above over the
  global batch (never the pair itself nor a pair with the same text; vlm.losses.matching's rules).
  The negatives' ViT features and tokens come from any device (vlm.losses.take_rows), so the
  ViT runs once per image; the loss is vlm.losses.itm_loss.
- ITG: the multimodal-causal pass over [queries; [DEC] w1 .. EOS] predicts token t + 1 at t
  (vlm.losses.caption_loss, padding ignored, label smoothing 0.1 as LAVIS). Its query outputs
  equal the unimodal ones (queries never see text), so ITC's image embeddings come from this pass.

batch: 'image' [B, H, W, 3], 'text' [B, T] = [BOS (the [CLS]), w1, .., EOS, pad..]. Terms with
weight 0 are skipped. Metrics: itc_loss, itm_loss, itg_loss and their accuracies, scale.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from vlm import parallel
from vlm.losses import caption_loss, itm_loss, take_rows
from vlm.losses.matching import hard_negative_indices, similarities
from vlm.losses.contrastive import all_gather_batch
from vlm.objectives.base import OBJECTIVES


def _smoothed_ce(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
  """Per-row cross-entropy [b] of logits [b, C] against integer labels with uniform label smoothing."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  return (1.0 - smoothing) * nll - smoothing * jnp.mean(logp, axis=-1)


def max_query_itc_loss(
  zimg: jax.Array, ztxt: jax.Array, scale: jax.Array, *, label_smoothing: float = 0.0, mesh: Mesh | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """BLIP-2's ITC: zimg [B, Q, E], ztxt [B, E] (global, L2-normalised) -> (loss [], metrics).

  loss = 0.5 * (mean_i CE(scale * sim(i, :), i) + mean_t CE(scale * sim(:, t), t)), sim(i, t) =
  max_q <zimg[i, q], ztxt[t]>, over the global batch. Metrics: i2t / t2i accuracy of the argmax.
  """
  axes = parallel.data_axes(mesh)
  scale = jnp.asarray(scale, jnp.float32)

  def per_device(zi, zt, s):
    b = zi.shape[0]
    index = jax.lax.axis_index(axes) if axes else 0
    zi_all, zt_all = all_gather_batch(zi, axes), all_gather_batch(zt, axes)
    i2t, t2i = similarities(zi, zt, zi_all, zt_all)
    labels = index * b + jnp.arange(b)
    local = jnp.sum(_smoothed_ce(s * i2t, labels, label_smoothing)) + jnp.sum(
      _smoothed_ce(s * t2i, labels, label_smoothing)
    )
    stats = jnp.stack([local, jnp.sum(jnp.argmax(i2t, -1) == labels), jnp.sum(jnp.argmax(t2i, -1) == labels)])
    stats = jax.lax.psum(stats, axes) if axes else stats
    n = zi_all.shape[0]  # the global batch
    return 0.5 * stats[0] / n, {"i2t_accuracy": stats[1] / n, "t2i_accuracy": stats[2] / n}

  spec = P(axes if axes else None, None)
  return parallel.shard_map_or_call(
    per_device,
    mesh,
    (zimg.astype(jnp.float32), ztxt.astype(jnp.float32), scale),
    (P(axes if axes else None, None, None), spec, P()),
    (P(), P()),
  )


@OBJECTIVES.register("blip2_stage1")
@dataclasses.dataclass(frozen=True)
class Blip2Stage1:
  """ITC + ITM + ITG of a vlm.models.blip2.Blip2QFormer; see the module docstring.

  pad_id: text padding (ignored by ITG). itm_hard_negatives=False draws ITM negatives uniformly.
  """

  itc_weight: float = 1.0
  itm_weight: float = 1.0
  itg_weight: float = 1.0
  itc_label_smoothing: float = 0.1
  itg_label_smoothing: float = 0.1
  itm_hard_negatives: bool = True
  pad_id: int = 0
  mesh: Mesh | None = None

  def __post_init__(self):
    if not any((self.itc_weight, self.itm_weight, self.itg_weight)):
      raise ValueError("objective: every loss weight is 0")

  def init_args(self, batch) -> tuple:
    return (batch["image"][:1], batch["text"][:1])

  def __call__(self, model: nn.Module, params, batch, *, rng, train: bool):
    images, text = batch["image"], batch["text"]
    r_drop, r_neg = jax.random.split(rng)
    cls = type(model)

    def apply(method, *args, salt: int = 0, **kw):
      return model.apply(
        {"params": params}, *args, train=train, method=method, rngs={"dropout": jax.random.fold_in(r_drop, salt)}, **kw
      )

    feats = apply(cls.image_features, images, salt=0)  # [B, N, Dv], the ViT runs once
    metrics, total = {}, 0.0
    if self.itg_weight:
      zimg, logits = apply(cls.encode_image_and_itg, None, text, salt=1, features=feats)
      targets = text[:, 1:]
      itg, m = caption_loss(logits[:, :-1], targets, targets != self.pad_id, label_smoothing=self.itg_label_smoothing)
      metrics.update({f"itg/{k}": v for k, v in m.items()}, itg_loss=itg)
      total += self.itg_weight * itg
    elif self.itc_weight or self.itm_weight:
      zimg, _ = apply(cls.encode_image, None, salt=1, features=feats)
    if self.itc_weight or self.itm_weight:
      ztxt, _ = apply(cls.encode_text, text, salt=2)
      scale, _ = model.apply({"params": params}, method=lambda m: m.scale_and_bias())
      metrics["scale"] = scale
      if self.itc_weight:
        itc, m = max_query_itc_loss(zimg, ztxt, scale, label_smoothing=self.itc_label_smoothing, mesh=self.mesh)
        metrics.update({f"itc/{k}": v for k, v in m.items()}, itc_loss=itc)
        total += self.itc_weight * itc
      if self.itm_weight:
        neg_txt, neg_img = hard_negative_indices(
          zimg, ztxt, r_neg, scale=scale, tokens=text, hard=self.itm_hard_negatives, mesh=self.mesh
        )
        neg_text, neg_feats = take_rows(text, neg_txt, self.mesh), take_rows(feats, neg_img, self.mesh)
        # [B, 3, ...] -> [3B, ...] keeps every device's rows on that device (see vlm.objectives.vlmo).
        b = text.shape[0]
        triple = lambda x, y, z: jnp.stack([x, y, z], axis=1).reshape(3 * b, *x.shape[1:])  # noqa: E731
        logits = apply(
          cls.itm_logits, None, triple(text, text, neg_text), salt=3, features=triple(feats, neg_feats, feats)
        ).reshape(b, 3, 2)
        itm, m = itm_loss(logits[:, 0], logits[:, 1:].reshape(2 * b, 2))
        metrics.update({f"itm/{k}": v for k, v in m.items()}, itm_loss=itm)
        total += self.itm_weight * itm
    return total, metrics
