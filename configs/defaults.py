"""The values of vlm that the recipes read, held on the config side so that reading a config imports no vlm (no jax).

Each name mirrors one of vlm's (named in its comment or docstring); vlm keeps its own definition, and
tests/test_config_values.py checks that the two stay equal. This module imports only the standard library
and ml_collections, like every module of configs/.
"""

import math
from collections.abc import Sequence

import ml_collections

# ------------------------------------------------------------------------------------ trainer

# Mirrors vlm.parallel.DATA_AXES: the batch is split over these mesh axes.
DATA_AXES: tuple[str, ...] = ("data", "fsdp")

# Mirrors vlm.parallel.DEFAULT_RULES: logical axis name -> mesh axes.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("act_batch", DATA_AXES),
  ("act_len", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_mlp", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv", None),
  ("vocab", "tensor"),
  ("proj", None),
  ("pos", None),
  ("norm", None),
  ("layers", None),
)


def peft_config() -> ml_collections.ConfigDict:
  """Mirrors vlm.peft.default_config(): a `config.peft` block with PEFT off (method='').

  The keys and defaults are those of vlm.peft.PeftConfig, in its field order.
  """
  return ml_collections.ConfigDict(
    dict(
      method="",
      rank=8,
      alpha=16.0,
      targets=(r".*attn/(query|value)",),
      dropout=0.0,
      adapter_dim=64,
      adapter_targets=(r".*(block_\d+|layers)",),
      train_also=(),
      save_only_peft=False,
    )
  )


# --------------------------------------------------------------------------------------- data


def data_config() -> ml_collections.ConfigDict:
  """Mirrors vlm.data.get_default_config() (vlm/data/pipeline.py): `config.data` for the embedded scenes at 64 px."""
  c = ml_collections.ConfigDict()
  c.source = "embedded"
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.builder = ml_collections.ConfigDict(
    dict(
      num_train=20000,
      num_validation=1000,
      num_test=2000,
      image_size=64,
      num_frames=0,
      seed=0,
      vocab_size=1000,
      text_rich=0,
      noise_shuffled=0,
      noise_duplicates=0,
      documents=0,
    )
  )
  c.image_size = 64
  c.pp_train = "decode|random_resized_crop(64, scale=(0.8, 1))|flip_lr|value_range(-1, 1)"
  c.pp_eval = "decode|resize(64)|value_range(-1, 1)"
  c.text_length = 32
  c.detailed_text_length = 64
  c.caption_key = "caption"
  c.tokenizer = ml_collections.config_dict.placeholder(str)
  c.tokenizer_family = ml_collections.config_dict.placeholder(str)
  c.add_bos = False
  c.add_eos = True
  c.extra_text_keys = ()
  c.question_regex = ml_collections.config_dict.placeholder(str)
  c.interleaved_images = 1
  c.max_images = 4
  c.mixgen = 0.0
  c.with_boxes = False
  c.max_boxes = 8
  c.with_frames = False
  c.worker_count = -1
  c.prefetch = 2
  c.read_threads = 0
  c.strict = False
  c.image_root = ml_collections.config_dict.placeholder(str)
  c.allow_absolute_paths = False
  c.max_image_pixels = 64_000_000  # vlm.data.sources.MAX_IMAGE_PIXELS
  c.max_consecutive_bad = 1000  # vlm.data.pipeline.MAX_CONSECUTIVE_BAD
  c.max_bad_fraction = 0.5  # vlm.data.pipeline.MAX_BAD_FRACTION
  c.bad_window = 10000  # vlm.data.pipeline.BAD_WINDOW
  return c


# The embedded scenes' vocabulary (vlm/data/scenes.py).
SCENE_COLOUR_NAMES: tuple[str, ...] = (
  "red",
  "green",
  "blue",
  "yellow",
  "purple",
  "orange",
  "pink",
  "cyan",
)  # mirrors vlm.data.scenes.COLOUR_NAMES (the keys of scenes.COLOURS, in order)
SCENE_SHAPES: tuple[str, ...] = (
  "circle",
  "square",
  "triangle",
  "star",
  "cross",
  "diamond",
  "arrow",
)  # mirrors vlm.data.scenes.SHAPES
SCENE_SIZES: tuple[str, ...] = ("small", "large")  # mirrors vlm.data.scenes.SIZES
SCENE_POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")  # mirrors vlm.data.scenes.POSITIONS
SCENE_MOTIONS: tuple[str, ...] = ("left", "right", "up", "down")  # mirrors vlm.data.scenes.MOTIONS
SCENE_WORDS: tuple[str, ...] = (
  "cat",
  "dog",
  "sun",
  "stop",
  "open",
  "exit",
  "sale",
  "jax",
  "tree",
  "bird",
  "fish",
  "moon",
  "go",
  "yes",
  "no",
  "map",
  "box",
  "car",
  "hat",
  "cup",
)  # mirrors vlm.data.scenes.WORDS


def scene_answer_vocab() -> list[str]:
  """Mirrors vlm.data.scenes.answer_vocab(): every answer of the scenes' VQA pairs, in a fixed order."""
  answers = [
    *SCENE_COLOUR_NAMES,
    *SCENE_SHAPES,
    "1",
    "2",
    "3",
    *SCENE_POSITIONS,
    *SCENE_SIZES,
    *SCENE_MOTIONS,
    *(str(i) for i in range(100)),
    *SCENE_WORDS,
  ]
  return list(dict.fromkeys(answers))


# LLaVA-NeXT's any-resolution grid, (height, width) in pixels; mirrors vlm.data.anyres.LLAVA_NEXT_PINPOINTS.
LLAVA_NEXT_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def _positive_int(v: object) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def anyres_max_image_tokens(
  grid_pinpoints: Sequence[Sequence[int]], tile_size: int, patch_grid: int | Sequence[int]
) -> int:
  """Mirrors vlm.data.anyres.max_image_tokens: the static length of the packed any-res image tokens,
  h*w + max over pinpoints of rows*h * (cols*w + 1) with (h, w) = patch_grid."""
  if _positive_int(patch_grid):
    ph = pw = int(patch_grid)
  elif isinstance(patch_grid, (tuple, list)) and len(patch_grid) == 2 and all(_positive_int(v) for v in patch_grid):
    ph, pw = int(patch_grid[0]), int(patch_grid[1])
  else:
    raise ValueError(f"patch_grid must be (height, width) of positive ints, got {patch_grid!r}")
  if not _positive_int(tile_size):
    raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
  if isinstance(grid_pinpoints, (str, bytes)) or not isinstance(grid_pinpoints, Sequence) or not grid_pinpoints:
    raise ValueError(f"grid_pinpoints must be a non-empty list of (height, width), got {grid_pinpoints!r}")
  points = [(int(h), int(w)) for h, w in grid_pinpoints]
  bad = [p for p in points if p[0] % tile_size or p[1] % tile_size]
  if bad:
    raise ValueError(f"grid_pinpoints {bad} are not multiples of tile_size {tile_size}")
  return ph * pw + max((h // tile_size) * ph * ((w // tile_size) * pw + 1) for h, w in points)


# ------------------------------------------------------------------------------------- models

# Mirrors vlm.models.two_tower.CLIP_TEMPERATURE_INIT (CLIP sec. 2.5: temperature 0.07, scale clamped at 100).
CLIP_TEMPERATURE_INIT: float = math.log(1 / 0.07)
# Mirrors vlm.models.blip2.BLIP2_TEMPERATURE_INIT (LAVIS: temperature 0.07, learned, clamped to [0.001, 0.5]).
BLIP2_TEMPERATURE_INIT: float = math.log(1 / 0.07)

# Mirrors vlm.models.blip2.EVA_VIT_G: EVA-CLIP ViT-g/14 without its last block, as BLIP-2 uses it.
EVA_VIT_G: dict = dict(
  variant="g/14",
  depth=39,
  class_token=True,
  pool_type="none",
  posemb="learn",
  posemb_grid=(16, 16),
  patch_bias=True,
  norm_eps=1e-6,
  mlp_act="gelu",
)
# Mirrors vlm.models.blip2.BERT_BASE_QFORMER: the BERT-base Q-Former ([DEC] = 30522 appended to BERT's vocabulary).
BERT_BASE_QFORMER: dict = dict(
  width=768,
  depth=12,
  num_heads=12,
  mlp_dim=3072,
  cross_attention_frequency=2,
  vocab_size=30523,
  max_len=512,
  norm_eps=1e-12,
  dropout=0.1,
)
