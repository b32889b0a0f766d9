"""Small random transformers models and their vlm imports shared by the HF test files: Llama / Qwen2 / Gemma
causal LMs (tests/test_decoder_lm.py, tests/test_hf_export_lm.py), LLaVA / LLaVA-NeXT
(tests/test_hf_llava.py, tests/test_hf_export_lm.py) and LLaVA-NeXT-Video / Video-LLaVA
(tests/test_hf_llava_next_video.py), with their batches. Needs torch and transformers.
Import as `from hf_builders import ...` (tests/ is on sys.path)."""

import functools
import json
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from conftest import hub_style_config, save_hub_style  # noqa: E402
from vlm.convert import import_hf  # noqa: E402
from vlm.models import build_model  # noqa: E402

# ------------------------------------------------------------------ causal LMs (DecoderLM)

VOCAB, PAD, EOS = 100, 0, 2
COMMON = dict(
  vocab_size=VOCAB,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=64,
  pad_token_id=PAD,
  bos_token_id=1,
  eos_token_id=EOS,
)
ARCHS = {
  "llama": lambda: transformers.LlamaForCausalLM(
    transformers.LlamaConfig(
      **COMMON, rope_parameters={"rope_type": "default", "rope_theta": 500.0}, tie_word_embeddings=False
    )
  ),
  "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, tie_word_embeddings=False)),
  "gemma": lambda: transformers.GemmaForCausalLM(
    transformers.GemmaConfig(**COMMON, head_dim=16, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
  ),
}


def make_lm(arch, factory=None):
  torch.manual_seed(0)
  model = (factory or ARCHS[arch])().eval()
  # HF inits norms to 1 (Gemma: 0) and biases to 0: perturb every tensor. Gemma's layers get more
  # noise: against its sqrt(D)-scaled tied embeddings they would otherwise just repeat the last token.
  layer_noise = 0.3 if arch.startswith("gemma") else 0.1
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_((0.1 if "embed" in name else layer_noise) * torch.randn_like(p))
  return model


@functools.cache
def imported_lm(arch, tmp_root):
  model = make_lm(arch)
  path = f"{tmp_root}/{arch}"
  # Qwen2 is saved sharded (model.safetensors.index.json + shards).
  model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": "20KB"} if arch == "qwen2" else {}))
  name, kwargs, params = import_hf(path)
  assert name == "decoder_lm"
  return model, build_model(name, kwargs), params, kwargs


def padded_batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, VOCAB, size=(4, 12))
  mask = np.ones_like(ids, dtype=bool)
  mask[1, 7:] = False  # right-padded
  mask[2, :3] = False  # left-padded
  mask[3, :5] = False  # left-padded
  ids[~mask] = PAD
  return ids, mask


def hub_import(name, factory, path, edit=None):
  """A random model saved the way 4.x Hub files are (save_hub_style), config.json optionally edited;
  returns (transformers' model loaded from that directory, our model, params, kwargs, the file's config)."""
  save_hub_style(make_lm(name, factory), path)
  file = f"{path}/config.json"
  if edit:
    cfg = json.load(open(file))
    edit(cfg)
    json.dump(cfg, open(file, "w"))
  hf = type(factory()).from_pretrained(path).eval()
  mname, kwargs, params = import_hf(path)
  return hf, build_model(mname, kwargs), params, kwargs, json.load(open(file))


ORIG = 16  # max_position_embeddings / original_max_position_embeddings of the rope tests; sequences of 40
ROPE = {
  "llama3": dict(
    rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=ORIG
  ),
  "linear": dict(rope_type="linear", factor=3.0),
  "dynamic": dict(rope_type="dynamic", factor=2.0),
  "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIG),
  "yarn_mscale": dict(
    rope_type="yarn",
    factor=4.0,
    original_max_position_embeddings=ORIG,
    mscale=0.8,
    mscale_all_dim=0.5,
    beta_fast=16,
    beta_slow=2,
    truncate=False,
  ),
}


def rope_llama(rope_type):
  rp = dict(ROPE[rope_type], rope_theta=1000.0)
  common = dict(COMMON, max_position_embeddings=ORIG if rope_type == "dynamic" else 4 * ORIG)
  return lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_parameters=rp))


# ------------------------------------------------------------------ LLaVA / LLaVA-NeXT (VisionLanguageModel)

LLAVA_VOCAB, IMAGE = 200, 150  # PAD and EOS as the LMs'
SIZE, PATCH = 32, 8
NUM_PATCHES = (SIZE // PATCH) ** 2
# (vision_feature_layer, vision_feature_select_strategy, sharded, vision tower, language model)
CASES = {
  "penultimate_default": (-2, "default", False, "clip", "llama"),
  "last_full_sharded": (-1, "full", True, "clip", "llama"),
  "siglip_tower_full": (-2, "full", False, "siglip", "llama"),
  "siglip_gemma_full": (-2, "full", False, "siglip", "gemma"),
}
_TEXT = dict(
  vocab_size=LLAVA_VOCAB,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=128,
  pad_token_id=PAD,
  bos_token_id=1,
  eos_token_id=EOS,
)


def _text_config(text="llama"):
  if text == "gemma":  # Gemma's defaults: tanh-GELU, tied head, eps 1e-6; theta 10000
    return transformers.GemmaConfig(**_TEXT, head_dim=8)
  return transformers.LlamaConfig(**_TEXT, tie_word_embeddings=False)


def _make_llava(layer, strategy, tower="clip", text="llama"):
  torch.manual_seed(0)
  vision = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=SIZE, patch_size=PATCH
  )
  if tower == "clip":
    vc = transformers.CLIPVisionConfig(**vision, projection_dim=16)
  else:  # a SigLIP tower (no class token; its MAP head is saved but unused by LLaVA)
    vc = transformers.SiglipVisionConfig(**vision)
  tc = _text_config(text)
  cfg = transformers.LlavaConfig(
    vision_config=vc,
    text_config=tc,
    image_token_index=IMAGE,
    projector_hidden_act="gelu",
    vision_feature_layer=layer,
    vision_feature_select_strategy=strategy,
  )
  model = transformers.LlavaForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # HF inits norms to 1 and biases to 0: perturb every tensor
    for name, p in model.named_parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


@functools.cache
def imported_llava(case, tmp_root):
  layer, strategy, sharded, tower, text = CASES[case]
  hf = _make_llava(layer, strategy, tower, text)
  path = f"{tmp_root}/{case}"
  if sharded:
    hf.save_pretrained(path, safe_serialization=True, max_shard_size="20KB")
    file = pathlib.Path(path) / "config.json"
    file.write_text(json.dumps(hub_style_config(json.loads(file.read_text()))))
  else:
    save_hub_style(hf, path)
  hf = type(hf).from_pretrained(path).eval()  # transformers reads the same file
  name, kwargs, params = import_hf(path)
  assert name == "vision_lm"
  return hf, build_model(name, kwargs), params, kwargs, path


def _num_image_tokens(strategy, tower="clip"):  # LlavaProcessor: patches + CLS, minus the CLS for 'default'
  return NUM_PATCHES + (strategy == "full" and tower == "clip")


def llava_prompt(rng, strategy, n_images=1, before=3, after=4, tower="clip"):
  n = _num_image_tokens(strategy, tower)
  parts = [rng.integers(3, 100, size=before)]
  for _ in range(n_images):
    parts += [np.full(n, IMAGE), rng.integers(3, 100, size=2)]
  parts.append(rng.integers(3, 100, size=after))
  return np.concatenate(parts)


def llava_pixels(rng, n):
  return rng.normal(size=(n, 3, SIZE, SIZE)).astype(np.float32)  # NCHW


def nhwc(pixels):
  return jnp.asarray(pixels.transpose(0, 2, 3, 1))


NEXT_TILE, NEXT_PINPOINTS = 16, [[16, 32], [32, 16], [32, 32]]


def _tiny_clip_vision(image_size: int):
  """The tiny CLIP vision tower of the LLaVA-NeXT / video builders (width 16, 2 layers, PATCH patches)."""
  return transformers.CLIPVisionConfig(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=image_size,
    patch_size=PATCH,
  )


@functools.cache
def imported_llava_next(tmp_root):
  """A LlavaNextForConditionalGeneration (CLIP tower, Llama LM), saved hub-style, imported."""
  torch.manual_seed(1)
  vc = _tiny_clip_vision(NEXT_TILE)
  cfg = transformers.LlavaNextConfig(
    vision_config=vc,
    text_config=_text_config(),
    image_grid_pinpoints=NEXT_PINPOINTS,
    image_token_index=IMAGE,
    vision_feature_layer=-2,
  )
  hf = transformers.LlavaNextForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # HF inits norms to 1 and biases to 0: perturb every tensor
    for p in hf.parameters():
      p.add_(0.1 * torch.randn_like(p))
  path = f"{tmp_root}/llava_next"
  save_hub_style(hf, path)
  name, kwargs, params = import_hf(path)
  return type(hf).from_pretrained(path).eval(), build_model(name, kwargs), params, kwargs, path


def _next_batch(kwargs, sizes=((20, 37), (40, 18))):
  """(ids, views [B, V, t, t, 3], layout [B, 4], lengths) from the pp op `anyres` with the model's values."""
  from vlm.data.preprocess import apply_ops, parse_pp

  a = kwargs["anyres"]
  op = f"anyres({[list(p) for p in a['grid_pinpoints']]}, {a['tile_size']}, {a['patch_grid']})|value_range(0, 1)"
  rng = np.random.default_rng(4)
  exs = [apply_ops(parse_pp(op), {"image": rng.integers(0, 256, (*hw, 3), dtype=np.uint8)}, rng) for hw in sizes]
  lengths = [3 + ex["image_tokens"] + 4 for ex in exs]
  ids = np.zeros((len(sizes), max(lengths)), np.int64)
  for i, ex in enumerate(exs):  # text, the image's placeholders, text, then right padding
    ids[i, : lengths[i]] = np.concatenate(
      [rng.integers(3, 100, 3), np.full(ex["image_tokens"], IMAGE), rng.integers(3, 100, 4)]
    )
  views = np.stack([ex["image"] for ex in exs]).astype(np.float32)
  return ids, views, np.stack([ex["image_layout"] for ex in exs]), lengths


def next_logits_diff(hf, model, params, kwargs):
  """max |logits diff| (real positions) of our LLaVA-NeXT against a transformers one on _next_batch."""
  ids, views, layout, lengths = _next_batch(kwargs)
  with torch.no_grad():
    theirs = hf(
      input_ids=torch.tensor(ids),
      pixel_values=torch.tensor(views.transpose(0, 1, 4, 2, 3)),
      image_sizes=torch.tensor(layout[:, 2:]),
    ).logits.numpy()
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(views), jnp.asarray(ids), None, jnp.asarray(layout)))
  return max(float(np.abs(ours[i, :n] - theirs[i, :n]).max()) for i, n in enumerate(lengths))


# ------------------------------------------------------------------ LLaVA-NeXT-Video (VisionLanguageModel, videos)

VIDEO = 151  # video_token_index (IMAGE is image_token_index)
VIDEO_TILE, VIDEO_PINPOINTS = 40, [[40, 80], [80, 40], [80, 80]]  # a 5 x 5 patch grid per tile / frame
VIDEO_FRAMES = 3


def imported_llava_next_video(tmp_root, mode="average", stride=2):
  """A LlavaNextVideoForConditionalGeneration (CLIP tower with a 5 x 5 patch grid, Llama LM; spatial pooling
  `mode` with `stride`), saved hub-style, imported: (transformers' model read back, ours, params, kwargs, path)."""
  return _imported_llava_next_video(tmp_root, mode, stride)


@functools.cache
def _imported_llava_next_video(tmp_root, mode, stride):
  torch.manual_seed(2)
  vc = _tiny_clip_vision(VIDEO_TILE)
  cfg = transformers.LlavaNextVideoConfig(
    vision_config=vc,
    text_config=_text_config(),
    image_grid_pinpoints=VIDEO_PINPOINTS,
    image_token_index=IMAGE,
    video_token_index=VIDEO,
    vision_feature_layer=-2,
    spatial_pool_mode=mode,
    spatial_pool_stride=stride,
  )
  return _perturbed_import(
    transformers.LlavaNextVideoForConditionalGeneration(cfg).eval(), f"{tmp_root}/llava_next_video_{mode}_{stride}"
  )


def _perturbed_import(hf, path: str):
  """hf with every tensor perturbed (HF inits norms to 1 and biases to 0), saved hub-style at path and
  imported: (transformers' model read back, ours, params, kwargs, path)."""
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(0.1 * torch.randn_like(p))
  save_hub_style(hf, path)
  name, kwargs, params = import_hf(path)
  assert name == "vision_lm"
  return type(hf).from_pretrained(path).eval(), build_model(name, kwargs), params, kwargs, path


def video_tokens_per_frame(stride, grid=VIDEO_TILE // PATCH):  # LlavaNextVideoPooler: floor(g / s)^2
  return (grid // stride) ** 2


def video_prompt(rng, n_video_tokens, before=3, after=4, image_tokens=0):
  """Text, an image's placeholders (if image_tokens), text, a video's placeholders, text."""
  parts = [rng.integers(3, 100, size=before)]
  if image_tokens:
    parts += [np.full(image_tokens, IMAGE), rng.integers(3, 100, size=2)]
  parts += [np.full(n_video_tokens, VIDEO), rng.integers(3, 100, size=after)]
  return np.concatenate(parts)


def video_frames(rng, b, frames=VIDEO_FRAMES):
  """pixel_values_videos [B, F, 3, t, t] (transformers' layout) and ours [B, F, t, t, 3]."""
  pixels = rng.normal(size=(b, frames, 3, VIDEO_TILE, VIDEO_TILE)).astype(np.float32)
  return pixels, jnp.asarray(pixels.transpose(0, 1, 3, 4, 2))


# ------------------------------------------------------------------ Video-LLaVA (VisionLanguageModel, a video tower)


def imported_video_llava(tmp_root, strategy="default"):
  """A VideoLlavaForConditionalGeneration (image_tower and video_tower: two CLIP towers of one config with a
  4 x 4 patch grid at SIZE; Llama LM), saved hub-style, imported: (transformers' model, ours, params, kwargs,
  path)."""
  return _imported_video_llava(tmp_root, strategy)


@functools.cache
def _imported_video_llava(tmp_root, strategy):
  torch.manual_seed(3)
  vc = _tiny_clip_vision(SIZE)
  cfg = transformers.VideoLlavaConfig(
    vision_config=vc,
    text_config=_text_config(),
    image_token_index=IMAGE,
    video_token_index=VIDEO,
    vision_feature_layer=-2,
    vision_feature_select_strategy=strategy,
  )
  return _perturbed_import(
    transformers.VideoLlavaForConditionalGeneration(cfg).eval(), f"{tmp_root}/video_llava_{strategy}"
  )


def video_llava_frames(rng, b, frames=VIDEO_FRAMES):
  """Video-LLaVA's pixel_values_videos [B, F, 3, SIZE, SIZE] and ours [B, F, SIZE, SIZE, 3]."""
  pixels = rng.normal(size=(b, frames, 3, SIZE, SIZE)).astype(np.float32)
  return pixels, jnp.asarray(pixels.transpose(0, 1, 3, 4, 2))
