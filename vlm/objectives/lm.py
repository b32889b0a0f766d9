"""Language modelling on (image-)text sequences: next-token loss on the tokens that carry loss."""

import dataclasses

import flax.linen as nn
from jax.sharding import Mesh

from vlm.losses import caption_loss
from vlm.objectives.base import OBJECTIVES
from vlm.train_step import InitKwargs


@OBJECTIVES.register("lm")
@dataclasses.dataclass(frozen=True)
class LanguageModeling:
  """Cross-entropy of logits[:, t] against tokens[:, t + 1] where loss_mask[:, t + 1] is set.

  With vlm.data.conversation batches that is the assistant's answers only (instruction tuning)
  or every token of a plain document (LM pretraining). image_key: None for a text-only DecoderLM
  (`model(tokens)`), else the batch key of the images (`model(images, tokens)`, e.g.
  VisionLanguageModel, called with return_stats=True). Right padding needs no attention mask:
  attention is causal. Metrics: token_accuracy on the loss tokens, and (with images) the model's
  image_token_mismatch: the fraction of rows whose image placeholder count is neither 0 nor what
  the images give (data.conversation.image_tokens disagrees with the model).

  Packed batches (data.conversation.pack > 1) hold `segment_ids_key` [B, T]: it goes to the model
  (`model(tokens, segment_ids=...)` / `model(images, tokens, segment_ids=...)`: attention within
  each packed sequence), and a target counts only when it is in the same segment as the position
  predicting it, so no sequence's last token is trained to predict the next sequence's first.

  A batch with `instruction_key` [B, L] (data.conversation.instruction_length > 0) passes it to the
  model as `instruction` (the instruction-aware Q-Former of vlm.models.vision_lm); one with
  `layout_key` [B, 4] (the pp op `anyres`) passes it as `image_layout` (LLaVA-NeXT AnyRes).

  video_key (e.g. 'frames', data.with_frames' clips [B, F, H, W, 3]): the clips go to the model as
  `videos` (VisionLanguageModel's video_token_id placeholders: data.conversation.video_tokens); with
  image_key None as well the model gets no images (`model(None, tokens, videos=...)`).
  """

  image_key: str | None = "image"
  tokens_key: str = "tokens"
  loss_mask_key: str = "loss_mask"
  segment_ids_key: str = "segment_ids"
  instruction_key: str = "instruction"
  layout_key: str = "image_layout"
  video_key: str | None = None
  label_smoothing: float = 0.0
  z_loss: float = 0.0
  mesh: Mesh | None = None

  def _inputs(self, batch) -> tuple:
    keys = ((self.image_key,) if self.image_key else ()) + ((self.video_key,) if self.video_key else ())
    keys += (self.tokens_key, self.loss_mask_key)
    missing = [k for k in keys if k not in batch]
    if missing:
      raise ValueError(
        f"objective 'lm': the batch has no {missing} (has {sorted(batch)}); set "
        "data.conversation (vlm.data.conversation), data.with_frames (video_key) or objective.image_key / "
        "tokens_key / video_key"
      )
    images = (batch[self.image_key],) if self.image_key else (None,) if self.video_key else ()
    return images + (batch[self.tokens_key],)

  def _instruction(self, batch) -> tuple:
    """(instruction, image_layout) as far as the batch has them (None where only the layout is there)."""
    if not self.image_key:
      return ()
    instruction = batch.get(self.instruction_key) if self.instruction_key else None
    layout = batch.get(self.layout_key) if self.layout_key else None
    if layout is not None:
      return (instruction, layout)
    return () if instruction is None else (instruction,)

  def init_args(self, batch) -> tuple:
    first = lambda x: None if x is None else x[:1]  # noqa: E731
    args = tuple(first(x) for x in self._inputs(batch) + self._instruction(batch))
    if self.video_key:  # the video params (a video tower, Video-LLaMA's Q-Formers) exist once a clip is seen
      args = args + (InitKwargs(videos=first(batch[self.video_key])),)
    return args

  def __call__(self, model: nn.Module, params, batch, *, rng, train: bool):
    inputs = self._inputs(batch) + self._instruction(batch)
    multimodal = bool(self.image_key or self.video_key)
    kw = {"return_stats": True} if multimodal else {}
    if self.video_key:
      kw["videos"] = batch[self.video_key]
    segments = batch.get(self.segment_ids_key) if self.segment_ids_key else None
    if segments is not None:
      kw["segment_ids"] = segments
    out = model.apply({"params": params}, *inputs, train=train, rngs={"dropout": rng}, **kw)
    logits, stats = out if multimodal else (out, {})
    tokens, weights = batch[self.tokens_key], batch[self.loss_mask_key]
    targets = weights[:, 1:] > 0
    if segments is not None:
      targets = targets & (segments[:, 1:] == segments[:, :-1])
    loss, metrics = caption_loss(
      logits[:, :-1], tokens[:, 1:], targets, label_smoothing=self.label_smoothing, z_loss=self.z_loss
    )
    return loss, dict(metrics, **stats)
