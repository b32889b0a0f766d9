r"""LLaVA-NeXT (LLaVA-1.6; Liu et al. 2024, "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge"):
LLaVA-1.5 (configs/llava_base.py) with "AnyRes" high-resolution input. Each image is shown to the
fixed-size CLIP encoder (336 px tiles) as

  the whole image resized to one tile (global view)  +  the tiles of the grid among
  `grid_pinpoints` that best fits its aspect ratio (the image resized into it, padding centred)

(the pp op `anyres`, vlm.data.anyres); every view goes through the encoder and the MLP connector
as one batch; the LM reads [global tokens; the tiles' feature grid with padding rows / columns cut
off ("unpad") and a learned `image_newline` after each row] (vlm.nn.anyres.AnyResPack inside
vlm.models.vision_lm with model.anyres). The number of image tokens depends on the image's size
(up to 2928 for the default pinpoints): the data writes each example's own count of `<image>`
placeholders. Imported checkpoints: vlm.convert.import_hf on an HF LlavaNextForConditionalGeneration
directory gives model kwargs with the same `anyres` (tests/test_anyres.py checks logits against HF).

Training (LLaVA-NeXT blog, "Training data / trainable" table): stage 1 as LLaVA-1.5's (the connector
on 558K captions: configs/llava_stage1.py); stage 2 (this config) trains the whole model on 760K
instruction examples, the vision encoder at 2e-6 and the rest at 2e-5 (lr_mults), batch 128.

Demo (`:demo`, the embedded text-rich scenes: small text legible at 64 px, a blur at 32 px), padded
to a random aspect ratio of 1:2, 1:1 or 2:1 (pp op `random_aspect_pad`) so the grids differ per
image. The encoder is the CLIP demo's image tower (32 px tiles, 4 x 4 features; it learns at a tenth
of the rate, as in stage 2 at scale), the LM configs/lm_pretrain.py's. Pinpoints: LLaVA-NeXT's set
scaled 336 -> 32 px plus 2 x 4 and 4 x 2 tiles, so that the demo's wide and tall images, like its
square ones, are seen at twice the tile's
resolution (the paper's set would give a 1:2 image only 1 x 2 tiles). The test bed is reading the
text (questions filtered to "what does the text say?", data.question_regex), as Monkey's demo.
`:demo_base` is the same model with one pinpoint, a single tile: the image padded to a square and
resized to 32 px (LLaVA-1.5's "pad" preprocessing) beside the global view, the resolution baseline.

  python -m vlm.train --config=configs/clip_b16.py:demo --workdir=/tmp/clip_demo
  python -m vlm.train --config=configs/lm_pretrain.py:demo --workdir=/tmp/vlm_lm_demo
  python -m vlm.train --config=configs/llava_next.py:demo --workdir=/tmp/llava_next_demo
  python -m vlm.train --config=configs/llava_next.py:demo_base --workdir=/tmp/llava_next_demo_base
  python -m vlm.predict --workdir=/tmp/llava_next_demo --image=PATH --prompt="what does the text say?"

(predict applies data.pp_eval, so the demo pads the given image to a drawn aspect ratio too.)

Demo result (2026-11-24, 800 steps, 2 cores shared with another job): text-reading exact match
55.9% (held-out combinations 52.8%; wide 55.3%, square 57.1%, tall 55.2%) in 30 min 11 s, against
2.9% for `:demo_base` (19 min 25 s); with the vision tower frozen, `:demo` gave 29.8%.
"""

import ml_collections

from configs.common import base_config, demo_data
from configs.lm_pretrain import conversation, demo_lm
from configs.llava_base import demo_init, demo_vision, model, vicuna_chat, vqa_eval
from configs.defaults import LLAVA_NEXT_PINPOINTS, anyres_max_image_tokens

DEMO_TILE = 32
# LLaVA-NeXT's pinpoints scaled 336 -> 32 px (1x2, 2x1, 2x2, 1x3, 3x1 tiles) plus 2x4 and 4x2.
DEMO_PINPOINTS = ((32, 64), (64, 32), (64, 64), (32, 96), (96, 32), (64, 128), (128, 64))
DEMO_BASE_PINPOINTS = ((32, 32),)


def anyres_pp(anyres_kw: dict, before: str = "decode", after: str = "normalize('clip')") -> str:
  """The pp string whose `anyres` op uses the model's own anyres values (one source for both)."""
  points = [list(p) for p in anyres_kw["grid_pinpoints"]]
  return f"{before}|anyres({points}, {anyres_kw['tile_size']}, {anyres_kw['patch_grid']})|{after}"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "demo", "demo_base"):
    raise ValueError(f"configs/llava_next.py: unknown variant {arg!r}; known: demo, demo_base")
  demo = bool(arg)
  c = base_config()
  c.model_name = "vision_lm"
  c.objective_name = "lm"
  c.objective = ml_collections.ConfigDict(dict(image_key="image"))
  if demo:
    points = DEMO_BASE_PINPOINTS if arg == "demo_base" else DEMO_PINPOINTS
    grid = DEMO_TILE // demo_vision()["patch_size"]
    c.model = dict(
      lm_config=demo_lm(),
      vision_config=demo_vision(),
      feature_layer=-2,
      keep_cls=False,
      connector_type="mlp",
      image_token_id=1000,
      anyres=dict(grid_pinpoints=points, tile_size=DEMO_TILE, patch_grid=grid),
    )
  else:
    # LLaVA-NeXT-7B (Vicuna-7B v1.5): LLaVA-1.5's model, CLIP ViT-L/14 at 336 px (24 x 24 features per tile).
    c.model = dict(model(demo=False), anyres=dict(grid_pinpoints=LLAVA_NEXT_PINPOINTS, tile_size=336, patch_grid=24))
  max_tokens = anyres_max_image_tokens(**c.model["anyres"])
  c.data.extra_text_keys = ("caption_detailed", "question", "answer")
  if demo:
    demo_data(c)
    c.data.builder.text_rich = 1
    # No flip: it would mirror the text. The aspect padding makes wide, square and tall images.
    c.data.pp_train = anyres_pp(
      c.model["anyres"], "decode|resize(64)|random_aspect_pad((0.5, 1.0, 2.0))", "value_range(-1, 1)"
    )
    c.data.pp_eval = c.data.pp_train
    c.data.caption_key = "caption"
    c.data.question_regex = "text say"
    c.data.conversation = conversation(
      ("qa", "detailed"), image_tokens=max_tokens, length=max_tokens + 40, task_weights=(3.0, 1.0)
    )
    c.data.conversation.max_turns = 1
    # As LLaVA-NeXT's stage 2, the whole model learns, the vision tower at a tenth of the rate.
    c.frozen = ()
    c.lr_mults = ((r"vision/.*", 0.1),)
    c.init = demo_init()
    c.batch_size = 64
    c.total_steps = 800
    c.lr = 1e-3
    c.wd = 0.0
    c.grad_clip_norm = 1.0
    c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=30))
    c.log_every = 25
    c.evals = vqa_eval(every=0)
  else:
    # LlavaNextImageProcessor: AnyRes views (bicubic), each tile CLIP-processed (rescale, OpenAI CLIP mean/std).
    c.data.pp_train = anyres_pp(c.model["anyres"], after="rescale|normalize('clip')")
    c.data.pp_eval = c.data.pp_train
    c.data.conversation = conversation(("qa", "detailed"), image_tokens=max_tokens, length=max_tokens + 1024)
    vicuna_chat(c.data.conversation)
    # Stage 2 from a stage-1 checkpoint (configs/llava_stage1.py) or an imported LLaVA-NeXT.
    c.init = ml_collections.ConfigDict(dict(path=None, mapping=None, step=None))
    c.frozen = ()  # the whole model learns; the vision encoder at a tenth of the rate (2e-6 vs 2e-5)
    c.lr_mults = ((r"vision/.*", 0.1),)
    c.lr = 2e-5
    c.wd = 0.0
    c.grad_clip_norm = 1.0
    c.batch_size = 128
    c.total_steps = 5938  # 760K instruction examples / 128
    c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=178))  # 3% warm-up
    c.evals = vqa_eval(every=5000, max_examples=None)
  if not demo:
    c.model.dtype = "bfloat16"  # activations and matmuls; params, optimiser state, loss, norms stay float32
    c.attention_impl = "auto"  # cuDNN flash attention on GPU where shapes and dtypes allow, else XLA
  c.checkpoint_every = c.total_steps
  return c
