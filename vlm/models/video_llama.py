"""Video-LLaMA's visual branch (Zhang et al. 2023, "Video-LLaMA", sec. 2.1): a clip -> a few LM-ready queries.

    videos [B, F, H, W, 3] -> per frame: BLIP-2's image encoder + Q-Former (frozen in the paper)
      -> frame queries [B, F, Q, Dq] + a learned temporal position embedding per frame [F, Dq]
      -> [B, F * Q, Dq] -> video Q-Former: Qv learned video queries cross-attend to every frame's queries
      -> [B, Qv, Dq]

The owner (vlm.models.vision_lm.VisionLanguageModel with vision_model='video_qformer' and
video_method='video_features') projects the Qv outputs into the LM (Video-LLaMA's `llama_proj`, the
'linear' connector). An image is a one-frame clip (`query_features`), as Video-LLaMA feeds images in its
image-caption stage. The paper's video Q-Former has 2 layers that cross-attend in every layer
(cross_attention_frequency 1) and 32 video queries; `VIDEO_QFORMER` holds those values at BERT-base width.

Params: frames/... (a Blip2QFormer with a queries-only Q-Former: img/..., qformer/..., query_tokens),
frame_position [max_frames, Dq], video_query_tokens [1, Qv, Dq], video_qformer/... (vlm.nn.qformer.QFormer).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.models.blip2 import Blip2QFormer
from vlm.nn.qformer import QFormer

# Video-LLaMA's video Q-Former (sec. 2.1; its code's init_video_Qformer: 2 BERT-base layers, cross-attention
# in every layer, no text side).
VIDEO_QFORMER: dict[str, Any] = dict(
  width=768, depth=2, num_heads=12, mlp_dim=3072, cross_attention_frequency=1, vocab_size=None
)


class VideoQFormer(nn.Module):
  """Clips [B, F, H, W, 3] -> video query outputs [B, Qv, Dq] (module docstring).

  Attributes:
    frames: Blip2QFormer kwargs of the per-frame encoder; its qformer must be queries-only
      (vocab_size None, BLIP-2 stage 2's) and its width is Dq.
    video_qformer: QFormer kwargs of the video Q-Former (VIDEO_QFORMER's by default; width must be Dq,
      vocab_size None).
    num_video_queries: Qv (Video-LLaMA: 32).
    max_frames: rows of the temporal position embedding (Video-LLaMA: 32); a clip may have fewer frames.
  """

  frames: dict
  video_qformer: dict | None = None
  num_video_queries: int = 32
  max_frames: int = 32
  dtype: Any = None

  def setup(self):
    if (self.frames.get("qformer") or {}).get("vocab_size", 1) is not None:
      raise ValueError("video_qformer: frames.qformer.vocab_size must be None (BLIP-2 stage 2's queries-only Q-Former)")
    self.frame_encoder = Blip2QFormer(**{"dtype": self.dtype, **self.frames}, name="frames")
    vq = dict(VIDEO_QFORMER if self.video_qformer is None else self.video_qformer)
    if vq.get("vocab_size") is not None:
      raise ValueError("video_qformer.vocab_size must be None: the video Q-Former has no text side")
    vq.setdefault("dtype", self.dtype)
    self.video_qformer_module = QFormer(**vq, name="video_qformer")
    width = self.video_qformer_module.width
    self.frame_position = self.param(
      "frame_position",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
      (self.max_frames, width),
    )
    self.video_query_tokens = self.param(
      "video_query_tokens",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
      (1, self.num_video_queries, width),
    )

  def frame_queries(self, videos: jax.Array, train: bool = False) -> jax.Array:
    """videos [B, F, H, W, 3] -> every frame's Q-Former query outputs plus its frame's temporal
    position embedding, [B, F, Q, Dq]."""
    if videos.ndim != 5:
      raise ValueError(f"video_qformer: videos must be [B, F, H, W, C], got shape {videos.shape}")
    b, f = videos.shape[:2]
    if f > self.max_frames:
      raise ValueError(
        f"video_qformer: a clip of {f} frames; the temporal position embedding has max_frames={self.max_frames}"
      )
    q = self.frame_encoder.query_features(videos.reshape(b * f, *videos.shape[2:]), train)
    if q.shape[-1] != self.frame_position.shape[-1]:
      raise ValueError(
        f"video_qformer: the frame Q-Former's width {q.shape[-1]} differs from the video Q-Former's "
        f"{self.frame_position.shape[-1]}"
      )
    q = q.reshape(b, f, *q.shape[1:])
    return q + self.frame_position[:f, None].astype(q.dtype)

  def video_features(self, videos: jax.Array, train: bool = False) -> jax.Array:
    """videos [B, F, H, W, 3] -> the video Q-Former's query outputs [B, Qv, Dq]."""
    frames = self.frame_queries(videos, train)
    b = frames.shape[0]
    context = frames.reshape(b, -1, frames.shape[-1])
    queries = jnp.broadcast_to(self.video_query_tokens, (b,) + self.video_query_tokens.shape[1:])
    return self.video_qformer_module(queries, None, context, mode="unimodal", train=train)

  def query_features(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images [B, H, W, 3] as one-frame clips -> [B, Qv, Dq]."""
    return self.video_features(images[:, None], train)

  def __call__(self, videos: jax.Array, train: bool = False) -> jax.Array:
    return self.video_features(videos, train)
