"""Video-LLaMA's visual branch (vlm.models.video_llama.VideoQFormer) alone and inside a VLM on an LM."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY_LM
from vlm.models import VideoQFormer, VisionLanguageModel

FRAMES = dict(
  image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, pool_type="none"),
  qformer=dict(width=32, depth=2, num_heads=2, mlp_dim=64, vocab_size=None),
  num_query_tokens=4,
)
VIDEO_QF = dict(width=32, depth=2, num_heads=2, mlp_dim=64, cross_attention_frequency=1, vocab_size=None)
VIDEO_ID = 1007


def _model(**kw) -> VideoQFormer:
  return VideoQFormer(frames=FRAMES, video_qformer=VIDEO_QF, num_video_queries=3, max_frames=6, **kw)


@pytest.fixture(scope="module")
def setup():
  videos = jax.random.normal(jax.random.key(0), (2, 4, 16, 16, 3))
  model = _model()
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), videos)["params"])
  return model, params, videos


@pytest.mark.slow
def test_clips_become_video_queries_with_frame_order_from_the_temporal_embedding(setup):
  model, params, videos = setup
  assert {"frames", "frame_position", "video_query_tokens", "video_qformer"} == set(params)
  assert params["frame_position"].shape == (6, 32) and params["video_query_tokens"].shape == (1, 3, 32)
  run = jax.jit(lambda p, v: model.apply({"params": p}, v))
  out = run(params, videos)
  assert out.shape == (2, 3, 32)
  # Each frame's queries are the per-frame Q-Former's plus that frame's position row.
  frames = model.apply({"params": params}, videos, method=VideoQFormer.frame_queries)
  per_frame = model.apply({"params": params}, videos[:, 2], method=lambda m, x: m.frame_encoder.query_features(x))
  np.testing.assert_allclose(frames[:, 2], per_frame + params["frame_position"][2], atol=1e-5)
  # Reversing the frames changes the output only through the temporal embedding: with it zeroed, the
  # video queries see a set of frame queries (cross-attention is order-blind).
  reverse = videos[:, ::-1]
  assert np.abs(run(params, reverse) - out).max() > 1e-3
  flat = dict(params, frame_position=jnp.zeros_like(params["frame_position"]))
  np.testing.assert_allclose(run(flat, reverse), run(flat, videos), atol=1e-5)
  # A frame's pixels reach the output.
  assert np.abs(run(params, videos.at[:, 3].add(1.0)) - out).max() > 1e-4


def test_too_many_frames_and_a_text_side_are_errors():
  videos = jnp.zeros((1, 7, 16, 16, 3))
  with pytest.raises(ValueError, match="a clip of 7 frames; the temporal position embedding has max_frames=6"):
    _model().init(jax.random.key(0), videos)
  with pytest.raises(ValueError, match="video_qformer.vocab_size must be None"):
    VideoQFormer(frames=FRAMES, video_qformer=dict(VIDEO_QF, vocab_size=100)).init(jax.random.key(0), videos)


@pytest.mark.slow
def test_video_llama_in_a_vlm_writes_the_video_queries_at_the_video_placeholders(setup):
  """vision_model='video_qformer' with video_method='video_features' and Video-LLaMA's linear projection:
  a clip becomes Qv = 3 LM tokens at the video placeholders; images are one-frame clips."""
  _, _, videos = setup
  vlm = VisionLanguageModel(
    lm_config=TINY_LM,
    vision_config=dict(frames=FRAMES, video_qformer=VIDEO_QF, num_video_queries=3, max_frames=6),
    vision_model="video_qformer",
    vision_method="query_features",
    video_method="video_features",
    connector_type="linear",
    video_token_id=VIDEO_ID,
  )
  tokens = jnp.array([[1, VIDEO_ID, VIDEO_ID, VIDEO_ID, 5, 6], [1, VIDEO_ID, VIDEO_ID, VIDEO_ID, 7, 8]])
  params = nn.meta.unbox(jax.jit(lambda k: vlm.init(k, None, tokens, videos=videos))(jax.random.key(2))["params"])
  assert params["connector"]["proj"]["kernel"].shape == (32, TINY_LM["width"])
  logits = vlm.apply({"params": params}, None, tokens, videos=videos)
  assert logits.shape == (2, 6, TINY_LM["vocab_size"])
  vid = vlm.apply({"params": params}, videos, method=VisionLanguageModel.encode_videos)
  queries = vlm.apply({"params": params}, videos, method=lambda m, v: m.vision.video_features(v))
  np.testing.assert_allclose(vid, vlm.apply({"params": params}, queries, method=lambda m, q: m.connector(q)), atol=1e-5)
  embeds = vlm.apply({"params": params}, tokens, videos=videos, method=VisionLanguageModel.embed)
  np.testing.assert_allclose(embeds[:, 1:4], vid, atol=1e-5)
  # The logits after the clip depend on it; those before it do not (causal LM).
  other = vlm.apply({"params": params}, None, tokens, videos=videos[::-1])
  assert np.abs(other[:, 4:] - logits[:, 4:]).max() > 1e-4
  np.testing.assert_allclose(other[:, 0], logits[:, 0], atol=1e-5)
  with pytest.raises(ValueError, match="model.video_method: a ViT encodes frames one by one"):
    VisionLanguageModel(lm_config=TINY_LM, vision_config=FRAMES["image"], video_method="video_features").init(
      jax.random.key(0), None, tokens, videos=videos
    )
