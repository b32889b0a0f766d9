"""Import of Hugging Face LlavaForConditionalGeneration (and LlavaNextForConditionalGeneration,
LlavaNextVideoForConditionalGeneration, VideoLlavaForConditionalGeneration) into
vlm.models.vision_lm.VisionLanguageModel.

`import_hf_llava(path)` -> ('vision_lm', VisionLanguageModel kwargs, params float32) from config.json +
model.safetensors (or sharded model.safetensors.index.json); `vlm.convert.import_hf` dispatches here
for model_type 'llava', 'llava_next', 'llava_next_video' and 'video_llava'. Never unpickles. The three parts
reuse the existing per-part tables:

- vision tower (CLIP or SigLIP vision model) -> vision/...: the CLIP / SigLIP image rows of
  vlm.convert.common (`vision_tower_rows`: `clip_table` / `siglip_table`, tower 'image', our 'img/' prefix
  dropped). CLIP's pre_layrnorm is our ViT's pre_norm; post_layernorm is imported as encoder_norm (LLaVA
  never applies it; absent, it is filled with the identity). A SigLIP tower's MAP head is unused by LLaVA
  and ignored.
- language model (Llama / Qwen2 / Gemma) -> lm/...: vlm.convert.common's lm_table and vlm.convert.llm's
  kwargs. Keys are accepted in both layouts (common.LM_LAYOUTS): `language_model.model.*` +
  `language_model.lm_head.*` (transformers < 4.52 and the llava-hf checkpoints) and `model.language_model.*`
  + `lm_head.*` (newer).
- multi_modal_projector.linear_{1,2} -> connector/fc{1,2} (connector 'mlp': Dense - exact GELU - Dense);
  only projector_hidden_act 'gelu' is expressible. Without projector biases
  (multimodal_projector_bias=False) the biases are zeros.

Features: HF takes vision hidden_states[vision_feature_layer] (block outputs, no post_layernorm), which
is our feature_layer (negative; a non-negative index i is converted to i - depth - 1; hidden_states[0],
the embeddings, is not expressible). Strategy 'default' drops the CLS token (keep_cls=False), 'full'
keeps it. A prompt holds one `image_token_index` placeholder per feature: num_patches for 'default',
num_patches + 1 for 'full' (CLIP), as LlavaProcessor expands `<image>`.

LLaVA-NeXT (model_type 'llava_next'): the same three parts plus `image_newline` -> anyres/image_newline,
and `anyres` = dict(grid_pinpoints=config.image_grid_pinpoints, tile_size=vision image_size,
patch_grid=image_size / patch_size); the data's pp op `anyres` takes the same three values. Only
strategy 'default' (HF's packing reshapes the per-tile features into a grid, which a CLS token breaks).

LLaVA-NeXT-Video (model_type 'llava_next_video'): LLaVA-NeXT's parts and `anyres` for images, plus video
input: video_token_index -> video_token_id, and the vision_resampler (LlavaNextVideoPooler) ->
video_pool = dict(mode=spatial_pool_mode, stride=spatial_pool_stride), pooling each frame's feature grid
before the shared projector. Modes 'average' and 'max' (no parameters); 'conv' (a learned Conv2d,
vision_resampler.pool.*) is a ConfigError. A prompt holds F * floor(g / stride)^2 video placeholders per
video of F frames (g = image_size / patch_size), as LlavaNextVideoProcessor expands `<video>`.

Video-LLaVA (model_type 'video_llava'): LLaVA's parts (plain images, no AnyRes) with two towers of the
same vision_config: image_tower -> vision/..., video_tower -> video_vision/... (video_encoder='separate'),
one shared projector. Frames keep every token of the feature layer, the CLS included, whatever
vision_feature_select_strategy says for images (HF's get_video_features applies no strategy):
video_keep_cls=True, and a prompt holds F * (num_patches + 1) video placeholders per video (CLIP).

config.json is read only through vlm.convert.hf_config: fields it leaves out take the defaults of
transformers' config classes (LlavaConfig / LlavaNextConfig / LlavaNextVideoConfig / VideoLlavaConfig, and
CLIPVisionConfig, SiglipVisionConfig, LlamaConfig, ... for the sub-configs; the parent's own CLIP ViT-L/14
(336 px; Video-LLaVA's 224) when vision_config is absent),
as `from_pretrained` does for the Hub files that list only the overrides. What VisionLanguageModel
cannot express is a ConfigError naming the file, key and value. Export back: vlm.convert.export_lm.
"""

from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from vlm.convert import hf_config, llm
from vlm.convert.common import (
  LM_LAYOUTS,
  Part,
  apply_part,
  lm_table,
  stack_encoder_blocks,
  tower_kwargs,
  vision_tower_rows,
)
from vlm.convert.hf_config import HFConfig
from vlm.convert.registry import register_importer
from vlm.convert.safetensors_io import load_safetensors_dir

MODEL_TYPES = ("llava", "llava_next", "llava_next_video", "video_llava")
ANYRES_TYPES = ("llava_next", "llava_next_video")  # AnyRes images and an image_newline
VIDEO_POOL_MODES = ("average", "max")  # LlavaNextVideoPooler's parameter-free modes
VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
# Kept for vlm.convert.blip2 (which merges it under its text config before model_kwargs_from_hf_llm): empty,
# since model_kwargs_from_hf_llm fills transformers' defaults itself (hf_config). Remove with blip2's use.
_TEXT_DEFAULTS: dict[str, dict] = {}


def _tower_prefixes(tower: str) -> tuple[str, ...]:
  """Where a vision tower lives in the two key layouts (longest prefix first)."""
  return (f"model.{tower}.vision_model.", f"model.{tower}.", f"{tower}.vision_model.", f"{tower}.")


# Where the parts live in the two key layouts (longest prefix first), and the prefix our tables use.
_VISION_PREFIXES = _tower_prefixes("vision_tower")
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
_NEWLINE_KEYS = ("model.image_newline", "image_newline")
_IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")


def _configs(config: "dict | HFConfig") -> tuple[HFConfig, HFConfig, HFConfig]:
  """(llava, vision, text) HFConfigs of a LlavaConfig / LlavaNextConfig (a config.json dict or HFConfig)."""
  top = llm.as_config(config)
  if top.model_type not in MODEL_TYPES:
    raise top.error("model_type", f"expected one of {MODEL_TYPES}")
  vc, tc = top["vision_config"], top["text_config"]
  if vc.model_type not in VISION_TYPES:
    raise top.error(
      "vision_config", f"vision_config.model_type {vc.model_type!r} is not supported; supported: {VISION_TYPES}"
    )
  return top, vc, tc


def _int(c: HFConfig, key: str) -> int:
  """An image_size / patch_size: an int, or [h, w] with h == w."""
  v = c[key]
  if isinstance(v, int):
    return v
  if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == v[1]:
    return int(v[0])
  raise c.error(key, "only square sizes are supported")


def _vision_kwargs(vc: HFConfig) -> dict[str, Any]:
  """ViT kwargs for an HF CLIP / SigLIP vision config (the layouts of vlm.convert.hf.model_kwargs_from_hf)."""
  size, patch = _int(vc, "image_size"), _int(vc, "patch_size")
  grid = size // patch
  kw = dict(tower_kwargs(vc), patch_size=patch, posemb="learn", posemb_grid=(grid, grid))
  if vc.model_type == "clip_vision_model":
    return dict(kw, class_token=True, pre_norm=True, patch_bias=False)
  return dict(kw, class_token=False)


def _feature_layer(top: HFConfig, depth: int) -> int:
  """HF's vision_feature_layer (an index into depth + 1 hidden_states) -> our feature_layer in [-depth, -1]."""
  layer = top["vision_feature_layer"]
  if isinstance(layer, bool) or not isinstance(layer, int):
    raise top.error(
      "vision_feature_layer",
      "several layers concatenated (VipLlava-style) are not expressible by VisionLanguageModel (one feature_layer)",
    )
  ours = layer - (depth + 1) if layer >= 0 else layer  # hidden_states[0] = the embeddings
  if ours == -(depth + 1):
    raise top.error(
      "vision_feature_layer",
      f"the embedding output of a {depth}-block tower, which VisionLanguageModel cannot select (block outputs only)",
    )
  if not -depth <= ours < 0:
    raise top.error("vision_feature_layer", f"out of range for a {depth}-block tower")
  return ours


def _tower_part(tensors: dict[str, np.ndarray], tower: str, what: str) -> Part | None:
  """The Part ('vision_model.*') of the tower stored under one of _tower_prefixes(tower), or None."""
  vp = next((p for p in _tower_prefixes(tower) if f"{p}embeddings.patch_embedding.weight" in tensors), None)
  return None if vp is None else Part(what, {vp: "vision_model."})


def _split(tensors: dict[str, np.ndarray], tower: str = "vision_tower") -> tuple[Part, Part, Part, list[str]]:
  """The checkpoint as (vision 'vision_model.*', LM 'model.*' / 'lm_head.*', projector 'linear_*', other keys);
  tower: where the image tower is ('vision_tower'; Video-LLaVA's 'image_tower')."""
  vision = _tower_part(tensors, tower, "vision tower" if tower == "vision_tower" else tower.replace("_", " "))
  lm_map = next((m for m in LM_LAYOUTS if any(k.startswith(next(iter(m))) for k in tensors)), None)
  if vision is None or lm_map is None:
    raise ValueError(
      "not a LlavaForConditionalGeneration checkpoint: no vision tower under "
      f"{_tower_prefixes(tower)} or no language model under 'language_model.model.' / "
      f"'model.language_model.'; keys: {sorted(tensors)[:10]}"
    )
  vp = next(iter(vision.renames))
  pp = next(
    (p for p in _PROJECTOR_PREFIXES if any(k.startswith(p) for k in tensors)),
    "model.multi_modal_projector." if vp.startswith("model.") else "multi_modal_projector.",
  )
  lm = Part("language model", lm_map)
  proj = Part("multi_modal_projector", {pp: ""})
  rest = [k for k, v in tensors.items() if not (vision.take(k, v) or lm.take(k, v) or proj.take(k, v))]
  return vision, lm, proj, rest


def model_kwargs_from_hf_llava(
  config: "dict | HFConfig", tensors: dict[str, np.ndarray] | None = None
) -> dict[str, Any]:
  """VisionLanguageModel kwargs from an HF LlavaConfig / LlavaNextConfig / LlavaNextVideoConfig / VideoLlavaConfig
  (a config.json dict or an HFConfig;
  tensors, the LM's under canonical keys, if given, decide the tying as transformers does)."""
  top, vc, tc = _configs(config)
  top.choice("projector_hidden_act", {"gelu": "gelu"})  # our 'mlp' connector: Dense - exact GELU - Dense
  strategy = top.choice("vision_feature_select_strategy", ("default", "full"))
  vit = _vision_kwargs(vc)
  if strategy == "default" and not vit["class_token"]:
    raise top.error(
      "vision_feature_select_strategy",
      f"on a {vc.model_type} tower (no class token) HF drops the "
      "first patch; VisionLanguageModel drops only a class token",
    )
  # LlavaConfig.__post_init__: the text config's tie_word_embeddings ties the model's head too.
  tie = bool(top["tie_word_embeddings"] or tc["tie_word_embeddings"])
  token = _token_id(top, "image")
  kwargs = dict(
    lm_config=llm.model_kwargs_from_hf_llm(tc, tensors, tie=tie),
    vision_config=vit,
    vision_model="vit",
    feature_layer=_feature_layer(top, vit["depth"]),
    keep_cls=strategy == "full",
    pool=None,
    connector_type="mlp",
    prefix_tokens=1,
    image_token_id=int(token),
  )
  if top.model_type in ANYRES_TYPES:
    if strategy == "full" and vit["class_token"]:
      raise top.error(
        "vision_feature_select_strategy",
        "LLaVA-NeXT lays each tile's features out as a grid, which a CLS token breaks (transformers too)",
      )
    tile = _int(vc, "image_size")
    points = top["image_grid_pinpoints"]
    if not isinstance(points, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in points):
      raise top.error("image_grid_pinpoints", "expected a list of [height, width] pairs")
    kwargs["anyres"] = dict(
      grid_pinpoints=tuple(tuple(int(v) for v in p) for p in points),
      tile_size=tile,
      patch_grid=tile // _int(vc, "patch_size"),
    )
  if top.model_type == "llava_next_video":
    mode = top.choice("spatial_pool_mode", VIDEO_POOL_MODES)
    stride = top["spatial_pool_stride"]
    grid = kwargs["anyres"]["patch_grid"]
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= grid:
      raise top.error("spatial_pool_stride", f"expected an int in [1, {grid}] (the frame's {grid} x {grid} patch grid)")
    video = _token_id(top, "video")
    if video == kwargs["image_token_id"]:
      raise top.error("video_token_index", "the same id as image_token_index")
    kwargs.update(video_token_id=int(video), video_pool=dict(mode=mode, stride=stride))
  if top.model_type == "video_llava":  # its own video tower; frames keep all tokens (no select strategy)
    video = _token_id(top, "video")
    if video == kwargs["image_token_id"]:
      raise top.error("video_token_index", "the same id as image_token_index")
    kwargs.update(video_token_id=int(video), video_encoder="separate", video_keep_cls=True)
  return kwargs


def _token_id(top: HFConfig, kind: str) -> int:
  """image_token_index / video_token_index, or its alias image_token_id / video_token_id (the config classes'
  attribute_map) when only that is in the file."""
  index, alias = f"{kind}_token_index", f"{kind}_token_id"
  value = top[alias] if top.given(alias) and not top.given(index) else top[index]
  if isinstance(value, bool) or not isinstance(value, int):
    raise top.error(index if top.given(index) or not top.given(alias) else alias, "expected an int token id")
  return value


@register_importer(*MODEL_TYPES)
def import_hf_llava(path: str | Path, scan: bool = False) -> tuple[str, dict[str, Any], dict]:
  """HF LlavaForConditionalGeneration directory -> ('vision_lm', VisionLanguageModel kwargs, params float32).

  Raises naming the tensors that are absent or left unused, and for what the model cannot express.
  scan: the scanned layouts of both stacks, vision_config scan=True (vision/encoder/layers/...) and
  lm_config scan_layers=True (lm/decoder/layers/...).
  """
  path = Path(path)
  config = hf_config.read_config(path)
  top, vc, tc = _configs(config)
  tensors = load_safetensors_dir(path)
  newline = None
  if top.model_type in ANYRES_TYPES:
    key = next((k for k in _NEWLINE_KEYS if k in tensors), None)
    if key is None:
      raise ValueError(
        f"{path}: a {top.model_type} checkpoint without its image_newline ({' or '.join(_NEWLINE_KEYS)})"
      )
    newline = tensors.pop(key)
  video = None
  if top.model_type == "video_llava":  # its video tower first: the rest splits as LLaVA's, image_tower the tower
    video = _tower_part(tensors, "video_tower", "video tower")
    if video is None:
      raise ValueError(
        f"{path}: a video_llava checkpoint without its video tower (under {_tower_prefixes('video_tower')})"
      )
    tensors = {k: v for k, v in tensors.items() if not video.take(k, v)}
  vision, lm, proj, rest = _split(tensors, "image_tower" if video is not None else "vision_tower")
  kwargs = model_kwargs_from_hf_llava(top, lm.tensors)
  vit, lm_kw = kwargs["vision_config"], kwargs["lm_config"]

  # Vision tower(s). post_layernorm (our encoder_norm) is never used by LLaVA: the identity when pruned.
  width = vit["width"]
  vrows = [(hf, ours, kind, vit["num_heads"]) for hf, ours, kind in vision_tower_rows(vc)]
  flat = {}
  for tower, ours in ((vision, "vision"), (video, "video_vision")):
    if tower is None:
      continue
    if "vision_model.post_layernorm.weight" not in tower.tensors:
      tower.tensors["vision_model.post_layernorm.weight"] = np.ones((width,), np.float32)
      tower.tensors["vision_model.post_layernorm.bias"] = np.zeros((width,), np.float32)
    flat.update({(ours,) + k: v for k, v in apply_part(tower, vrows, path).items()})

  # Language model: vlm.convert.common's lm_table on the canonical keys.
  lrows = lm_table(lm_kw)
  flat.update({("lm",) + k: v for k, v in apply_part(lm, lrows, path, gemma_norm=tc.model_type == "gemma").items()})

  # Projector: Linear - GELU - Linear; zero biases when the checkpoint has none.
  if not top["multimodal_projector_bias"]:
    for i in (1, 2):
      proj.tensors.setdefault(f"linear_{i}.bias", np.zeros((lm_kw["width"],), np.float32))
  prows = [
    (f"linear_{i}.{w}", f"fc{i}/{o}", kind, 0)
    for i in (1, 2)
    for w, o, kind in (("weight", "kernel", "dense"), ("bias", "bias", "id"))
  ]
  flat.update({("connector",) + k: v for k, v in apply_part(proj, prows, path).items()})
  fc1 = flat[("connector", "fc1", "kernel")]
  if fc1.shape != (width, lm_kw["width"]):
    raise ValueError(
      f"{path}: {proj.stored('linear_1.weight')} maps {fc1.shape[0]} -> {fc1.shape[1]}; the "
      f"vision tower has width {width} and the LM {lm_kw['width']}"
    )

  if newline is not None:
    if newline.shape != (lm_kw["width"],):
      raise ValueError(f"{path}: image_newline has shape {newline.shape}, expected ({lm_kw['width']},)")
    flat[("anyres", "image_newline")] = np.asarray(newline, np.float32)

  # Everything else must be accounted for.
  ignored = {"lm_head.weight"} if lm_kw["tie_embeddings"] else set()  # a tied head saved anyway
  unused = list(rest)
  parts = [(vision, vrows), (lm, lrows), (proj, prows)] + ([(video, vrows)] if video is not None else [])
  for part, rows in parts:
    used = {r[0] for r in rows} | ignored
    unused += [
      part.stored(k)
      for k in part.tensors
      if k not in used and not k.endswith(_IGNORED_SUFFIXES) and not k.startswith("vision_model.head.")
    ]  # a SigLIP tower's MAP head: unused by LLaVA
  if unused:
    raise ValueError(f"{path}: tensors not used by the LLaVA importer (unsupported layout?): {sorted(unused)[:20]}")
  params = traverse_util.unflatten_dict(flat)
  if scan:
    kwargs = dict(kwargs, vision_config=dict(vit, scan=True), lm_config=dict(lm_kw, scan_layers=True))
    params = stack_encoder_blocks(params, names=("encoder", "decoder"))
  return "vision_lm", kwargs, params
