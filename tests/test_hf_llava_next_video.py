"""HF LlavaNextVideoForConditionalGeneration and VideoLlavaForConditionalGeneration import (vlm.convert.llava,
model_types 'llava_next_video', 'video_llava') and VisionLanguageModel's video input against small random
transformers models, saved with config.json as the Hub's 4.x files are (conftest.save_hub_style). The
LLaVA-NeXT-Video tower's 5 x 5 patch grid with stride 2 also checks that the pooling drops the remainder
row / column as LlavaNextVideoPooler's AvgPool2d / MaxPool2d do."""

import functools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from conftest import rewrite_checkpoint  # noqa: E402
from hf_builders import (  # noqa: E402
  EOS,
  IMAGE,
  NUM_PATCHES,
  PAD,
  PATCH,
  VIDEO,
  VIDEO_FRAMES,
  VIDEO_PINPOINTS,
  VIDEO_TILE,
  _next_batch,
  imported_llava_next_video,
  imported_video_llava,
  llava_pixels,
  nhwc,
  video_frames,
  video_llava_frames,
  video_prompt,
  video_tokens_per_frame,
)
from vlm.convert import import_hf, model_kwargs_from_hf_llava  # noqa: E402
from vlm.convert.hf_config import ConfigError  # noqa: E402
from vlm.models import build_model, predict_fns  # noqa: E402

TOL = 1e-4
NEW = 6
POOLS = [("average", 2), ("max", 2), ("max", 3)]  # (spatial_pool_mode, spatial_pool_stride)


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("hf_llava_next_video"))


def test_unsupported_video_config_raises_naming_the_key(tmp_root, tmp_path):
  _, _, _, _, path = imported_llava_next_video(tmp_root)
  with pytest.raises(ConfigError, match=r"config.json: spatial_pool_mode = 'conv': not supported .*'average', 'max'"):
    import_hf(rewrite_checkpoint(path, tmp_path / "conv", config={"spatial_pool_mode": "conv"}))
  cfg = json.load(open(f"{path}/config.json"))
  for value in (0, 6, 2.0):  # the grid is 5 x 5
    with pytest.raises(
      ConfigError, match=rf"config.json: spatial_pool_stride = {value!r}: expected an int in \[1, 5\]"
    ):
      model_kwargs_from_hf_llava(dict(cfg, spatial_pool_stride=value))
  with pytest.raises(ConfigError, match=r"video_token_index = 150: the same id as image_token_index"):
    model_kwargs_from_hf_llava(dict(cfg, video_token_index=IMAGE))
  with pytest.raises(ConfigError, match=r"vision_feature_select_strategy = 'full'"):
    model_kwargs_from_hf_llava(dict(cfg, vision_feature_select_strategy="full"))
  # The attribute_map alias (video_token_id) is read when the file has only that.
  alias = {k: v for k, v in cfg.items() if k != "video_token_index"}
  assert model_kwargs_from_hf_llava(dict(alias, video_token_id=7))["video_token_id"] == 7


def test_partial_config_takes_transformers_defaults():
  """A file with only model_type reads as LlavaNextVideoConfig()'s defaults (video 32000, image 32001,
  average pooling with stride 2 on CLIP ViT-L/14-336's 24 x 24 grid)."""
  cfg = {"model_type": "llava_next_video"}
  ours = model_kwargs_from_hf_llava(cfg)
  assert ours == model_kwargs_from_hf_llava(transformers.LlavaNextVideoConfig(**cfg).to_dict())
  assert (ours["video_token_id"], ours["image_token_id"]) == (32000, 32001)
  assert ours["video_pool"] == dict(mode="average", stride=2) and ours["anyres"]["patch_grid"] == 24


def _hf_generate(hf, ids, **pixels):
  with torch.no_grad():
    out = hf.generate(
      input_ids=torch.tensor(ids),
      attention_mask=torch.ones(ids.shape, dtype=torch.long),
      do_sample=False,
      max_new_tokens=NEW,
      eos_token_id=EOS,
      pad_token_id=PAD,
      **{k: torch.tensor(v) for k, v in pixels.items()},
    ).numpy()
  theirs = out[:, ids.shape[1] :]
  return np.pad(theirs, ((0, 0), (0, NEW - theirs.shape[1])), constant_values=PAD)


def _video_logits(hf, model, params, ids, pix, ours_pix):
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids), pixel_values_videos=torch.tensor(pix)).logits.numpy()
  ours = np.asarray(model.apply({"params": params}, None, jnp.asarray(ids), videos=ours_pix))
  assert ours.shape == theirs.shape
  return float(np.abs(ours - theirs).max())


@pytest.mark.slow
@pytest.mark.parametrize("mode,stride", POOLS)
def test_video_logits_match_hf(mode, stride, tmp_root):
  hf, model, params, kwargs, path = imported_llava_next_video(tmp_root, mode, stride)
  file_cfg = json.load(open(f"{path}/config.json"))
  assert not {"hidden_act", "layer_norm_eps"} & set(file_cfg["vision_config"])  # the tower's defaults left out
  assert kwargs["video_token_id"] == VIDEO and kwargs["image_token_id"] == IMAGE
  assert kwargs["video_pool"] == dict(mode=mode, stride=stride)
  assert kwargs["anyres"] == dict(
    grid_pinpoints=tuple(map(tuple, VIDEO_PINPOINTS)), tile_size=VIDEO_TILE, patch_grid=VIDEO_TILE // PATCH
  )
  rng = np.random.default_rng(0)
  n = VIDEO_FRAMES * video_tokens_per_frame(stride)
  ids = np.stack([video_prompt(rng, n) for _ in range(2)])  # one video per row
  pix, ours_pix = video_frames(rng, 2)
  diff = _video_logits(hf, model, params, ids, pix, ours_pix)
  print(f"llava_next_video {mode}/{stride}: max |logits diff| {diff:.2e}")
  assert diff <= TOL


@pytest.mark.slow
def test_image_and_video_in_one_forward_match_hf(tmp_root):
  """An AnyRes image and a video in the same rows, each at its own placeholders (HF fills both)."""
  hf, model, params, kwargs, _ = imported_llava_next_video(tmp_root)
  img_ids, views, layout, lengths = _next_batch(kwargs)
  rng = np.random.default_rng(1)
  n = VIDEO_FRAMES * video_tokens_per_frame(2)
  rows = []
  for i, length in enumerate(lengths):  # the image row (text, image, text), then a video and text
    rows.append(np.concatenate([img_ids[i, :length], np.full(n, VIDEO), rng.integers(3, 100, 3)]))
  t = max(map(len, rows))
  ids = np.stack([np.pad(r, (0, t - len(r)), constant_values=PAD) for r in rows])
  pix, ours_pix = video_frames(rng, len(rows))
  with torch.no_grad():
    theirs = hf(
      input_ids=torch.tensor(ids),
      pixel_values=torch.tensor(views.transpose(0, 1, 4, 2, 3)),
      image_sizes=torch.tensor(layout[:, 2:]),
      pixel_values_videos=torch.tensor(pix),
    ).logits.numpy()
  fwd = jax.jit(lambda p, v, i, lay, vid: model.apply({"params": p}, v, i, None, lay, videos=vid))
  ours = np.asarray(fwd(params, jnp.asarray(views), jnp.asarray(ids), jnp.asarray(layout), ours_pix))
  diff = max(float(np.abs(ours[i, : len(r)] - theirs[i, : len(r)]).max()) for i, r in enumerate(rows))
  print(f"llava_next_video image + video: max |logits diff| {diff:.2e}")
  assert diff <= TOL
  # The video is really written in: without it the logits differ.
  no_video = np.asarray(fwd(params, jnp.asarray(views), jnp.asarray(ids), jnp.asarray(layout), None))
  assert np.abs(no_video - ours).max() > 1e-3


def test_greedy_generation_after_a_video_matches_hf(tmp_root):
  hf, model, params, _, _ = imported_llava_next_video(tmp_root)
  rng = np.random.default_rng(2)
  n = VIDEO_FRAMES * video_tokens_per_frame(2)
  ids = np.stack([video_prompt(rng, n) for _ in range(2)])
  pix, ours_pix = video_frames(rng, 2)
  theirs = _hf_generate(hf, ids, pixel_values_videos=pix)
  gen = functools.partial(predict_fns(model)["generate"], max_new_tokens=NEW, eos_id=EOS, pad_id=PAD)
  ours = jax.jit(gen)(params, None, jnp.asarray(ids), videos=ours_pix)
  print(f"HF {theirs.tolist()} ours {np.asarray(ours.tokens).tolist()}")
  np.testing.assert_array_equal(np.asarray(ours.tokens), theirs)


def test_wrong_video_placeholders_and_videos_without_a_video_id_raise(tmp_root):
  hf, model, params, kwargs, _ = imported_llava_next_video(tmp_root)
  rng = np.random.default_rng(3)
  n = VIDEO_FRAMES * video_tokens_per_frame(2)
  pix, ours_pix = video_frames(rng, 2)
  ids = np.stack([video_prompt(rng, n), video_prompt(rng, n - 1, after=5)])  # row 1: one placeholder short
  with torch.no_grad(), pytest.raises(Exception, match="Video features and video tokens do not match"):
    hf(input_ids=torch.tensor(ids), pixel_values_videos=torch.tensor(pix))  # transformers refuses too
  with pytest.raises(ValueError, match=rf"videos: row 1 has {n - 1} video placeholders .*gives {n} tokens"):
    model.apply({"params": params}, None, jnp.asarray(ids), videos=ours_pix)
  # Under jit the count is data: the stats say which fraction of rows is off.
  _, stats = jax.jit(lambda p, i, v: model.apply({"params": p}, None, i, videos=v, return_stats=True))(
    params, jnp.asarray(ids), ours_pix
  )
  assert float(stats["video_token_mismatch"]) == 0.5
  no_video = build_model("vision_lm", dict(kwargs, video_token_id=None, video_pool=None))
  with pytest.raises(ValueError, match="videos: this model has no video_token_id"):
    no_video.apply({"params": params}, None, jnp.asarray(ids), videos=ours_pix)
  with pytest.raises(ValueError, match=r"model.video_pool.mode 'conv'"):
    build_model("vision_lm", dict(kwargs, video_pool=dict(mode="conv", stride=2))).apply(
      {"params": params}, None, jnp.asarray(ids), videos=ours_pix
    )


# ------------------------------------------------------------------ Video-LLaVA: a video tower of its own


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_video_llava_logits_match_hf(strategy, tmp_root):
  """Images through image_tower (CLS per the strategy), videos through video_tower with every token, CLS
  included, whatever the strategy; an image and a video in each row, and a video alone."""
  hf, model, params, kwargs, path = imported_video_llava(tmp_root, strategy)
  assert "video_vision" in params and "vision" in params
  assert (kwargs["video_encoder"], kwargs["video_keep_cls"], kwargs["keep_cls"]) == (
    "separate",
    True,
    strategy == "full",
  )
  assert kwargs["video_token_id"] == VIDEO and kwargs.get("video_pool") is None
  rng = np.random.default_rng(5)
  n_video = VIDEO_FRAMES * (NUM_PATCHES + 1)
  n_image = NUM_PATCHES + (strategy == "full")
  ids = np.stack([video_prompt(rng, n_video, image_tokens=n_image) for _ in range(2)])
  pix, ours_pix = video_llava_frames(rng, 2)
  img = llava_pixels(rng, 2)
  with torch.no_grad():
    theirs = hf(
      input_ids=torch.tensor(ids), pixel_values=torch.tensor(img), pixel_values_videos=torch.tensor(pix)
    ).logits.numpy()
  fwd = jax.jit(lambda p, im, i, v: model.apply({"params": p}, im, i, videos=v))
  ours = np.asarray(fwd(params, nhwc(img), jnp.asarray(ids), ours_pix))
  diff = float(np.abs(ours - theirs).max())
  print(f"video_llava {strategy} image + video: max |logits diff| {diff:.2e}")
  assert ours.shape == theirs.shape and diff <= TOL
  ids_v = np.stack([video_prompt(rng, n_video) for _ in range(2)])
  with torch.no_grad():
    theirs_v = hf(input_ids=torch.tensor(ids_v), pixel_values_videos=torch.tensor(pix)).logits.numpy()
  diff_v = float(np.abs(np.asarray(fwd(params, None, jnp.asarray(ids_v), ours_pix)) - theirs_v).max())
  print(f"video_llava {strategy} video only: max |logits diff| {diff_v:.2e}")
  assert diff_v <= TOL


def test_video_llava_greedy_generation_after_a_video_matches_hf(tmp_root):
  hf, model, params, _, _ = imported_video_llava(tmp_root)
  rng = np.random.default_rng(6)
  ids = np.stack([video_prompt(rng, VIDEO_FRAMES * (NUM_PATCHES + 1), image_tokens=NUM_PATCHES) for _ in range(2)])
  pix, ours_pix = video_llava_frames(rng, 2)
  img = llava_pixels(rng, 2)
  theirs = _hf_generate(hf, ids, pixel_values=img, pixel_values_videos=pix)
  gen = functools.partial(predict_fns(model)["generate"], max_new_tokens=NEW, eos_id=EOS, pad_id=PAD)
  ours = jax.jit(gen)(params, nhwc(img), jnp.asarray(ids), videos=ours_pix)
  print(f"HF {theirs.tolist()} ours {np.asarray(ours.tokens).tolist()}")
  np.testing.assert_array_equal(np.asarray(ours.tokens), theirs)


def test_video_llava_import_errors_name_the_tensor_or_key(tmp_root, tmp_path):
  _, _, _, _, path = imported_video_llava(tmp_root)
  keys = list(load_file(f"{path}/model.safetensors"))
  video_keys = tuple(k for k in keys if k.startswith("video_tower."))
  assert video_keys and any(k.startswith("image_tower.") for k in keys)
  with pytest.raises(ValueError, match="a video_llava checkpoint without its video tower"):
    import_hf(rewrite_checkpoint(path, tmp_path / "no_video", drop=video_keys))
  key = "video_tower.encoder.layers.1.mlp.fc2.weight"
  with pytest.raises(ValueError, match=rf"video tower tensors expected but absent: \['{key}'\]"):
    import_hf(rewrite_checkpoint(path, tmp_path / "missing", drop=(key,)))
  cfg = json.load(open(f"{path}/config.json"))
  with pytest.raises(ConfigError, match=r"video_token_index = 150: the same id as image_token_index"):
    model_kwargs_from_hf_llava(dict(cfg, video_token_index=IMAGE))


def test_video_llava_partial_config_takes_transformers_defaults():
  """VideoLlavaConfig()'s defaults: image 32000, video 32001, a CLIP ViT-L/14 at 224 (16 x 16 grid)."""
  cfg = {"model_type": "video_llava"}
  ours = model_kwargs_from_hf_llava(cfg)
  assert ours == model_kwargs_from_hf_llava(transformers.VideoLlavaConfig(**cfg).to_dict())
  assert (ours["image_token_id"], ours["video_token_id"]) == (32000, 32001)
  assert ours["vision_config"]["posemb_grid"] == (16, 16) and ours.get("anyres") is None
