r"""Monkey (Li et al. 2024, "Monkey: Image Resolution and Text Label Are Important Things for Large
Multi-modal Models"): a 896 px image cut into 2 x 2 windows of 448 px plus a 448 px global view,
one shared frozen ViT (Qwen-VL's ViT-bigG) with its own LoRA set per window position (rank 16 on
attention, 32 on MLP; none for the global view), a shared 256-query resampler per view, and the
LLM (Qwen-7B) reading [window tokens in row order; global tokens] (vlm.models.monkey, inside
vlm.models.vision_lm with vision_model='monkey'). Trained: LoRA sets, resampler, LLM (sec. 3.3).

Prompts (sec. 3.3): captions "Generate the caption in English:", detailed captions "Generate the
detailed caption in English:", VQA "{question} Answer: {answer}" (data.conversation.instructions /
question_format with a plain template: user "{content}", assistant " {content}<|end|>").

Demo (`:demo`, the embedded text-rich scenes: every image has a short word or number in small
type, legible at 64 px and a blur at 32 px): the sizes scaled down by 14 with the paper's ratio,
a 64 px input, 32 px windows (2 x 2) and global view. The frozen ViT is the CLIP demo's image
tower (trained at 32 px), the LM configs/lm_pretrain.py's; 16 resampler queries per view. The
test bed is reading the text: questions filtered to "what does the text say?"
(data.question_regex) for training and for the `vqa/accuracy` eval; detailed captions train too.
`:demo_global` is the same model fed only the resized global view (windows=False, 16 tokens):
the paper's resolution ablation (sec. 4.4).

  python -m vlm.train --config=configs/clip_b16.py:demo --workdir=/tmp/clip_demo
  python -m vlm.train --config=configs/lm_pretrain.py:demo --workdir=/tmp/vlm_lm_demo
  python -m vlm.train --config=configs/monkey.py:demo --workdir=/tmp/monkey_demo
  python -m vlm.train --config=configs/monkey.py:demo_global --workdir=/tmp/monkey_demo_global
  python -m vlm.predict --workdir=/tmp/monkey_demo --image=PATH --prompt="what does the text say? Answer:"

Demo result (2026-11-24, 800 steps each): text-reading exact match 68.2% with windows (23 min 46 s
on 2 cores shared with other jobs) against 2.9% for `:demo_global` (9 min 24 s): +65.3 points.
"""

import ml_collections

from configs.common import base_config, demo_data
from configs.lm_pretrain import conversation, demo_lm
from configs.llava_base import demo_init, demo_vision, vqa_eval

INSTRUCTIONS = dict(
  caption=("Generate the caption in English:",), detailed=("Generate the detailed caption in English:",)
)
TEMPLATE = dict(system="{content} ", user="{content}", assistant=" {content}<|end|>", generation_prefix="")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "demo", "demo_global"):
    raise ValueError(f"configs/monkey.py: unknown variant {arg!r}; known: demo, demo_global")
  return build(demo=bool(arg), windows=arg != "demo_global")


def build(demo: bool, windows: bool) -> ml_collections.ConfigDict:
  """The Monkey recipe; windows=False is Qwen-VL's visual side (configs/qwen_vl.py)."""
  c = base_config()
  c.model_name = "vision_lm"
  c.objective_name = "lm"
  c.objective = ml_collections.ConfigDict(dict(image_key="image"))
  if demo:
    queries, window, size = 16, 32, 64
    lm = demo_lm()
    vision = dict(
      image=dict(demo_vision(), class_token=False),
      resampler=dict(num_queries=queries, num_heads=4, out_dim=lm["width"]),
    )
  else:
    queries, window, size = 256, 448, 896
    # Qwen-7B and Qwen-VL's ViT-bigG/14 (1664 wide, 48 layers) with its 256-query resampler to 4096.
    lm = dict(
      vocab_size=151_936,
      width=4096,
      depth=32,
      num_heads=32,
      mlp_dim=11_008,
      mlp_act="swiglu",
      rope_theta=10_000.0,
      norm_eps=1e-6,
      tie_embeddings=False,
      scan_layers=True,
      remat_policy="dots",
    )  # one compiled block for the 32 (vlm.models.decoder)
    vision = dict(
      image=dict(
        width=1664, depth=48, mlp_dim=8192, num_heads=16, patch_size=14, class_token=False, pre_norm=True, norm_eps=1e-6
      ),
      resampler=dict(num_queries=queries, num_heads=32, width=4096, out_dim=lm["width"]),
    )
  views = (size // window) ** 2 + 1 if windows else 1
  c.model = dict(
    lm_config=lm,
    vision_model="monkey",
    vision_method="view_features",
    connector_type="none",
    image_token_id=1000 if demo else 151_859,  # Qwen-VL's image pad id (<imgpad>)
    vision_config=dict(vision, window_size=window, lora_attn_rank=16, lora_mlp_rank=32, windows=windows),
  )
  # The ViT is frozen; its per-window LoRA sets, the resampler and the LLM learn (sec. 3.3).
  c.frozen = (r"vision/img/(?!.*lora_sets_).*",)
  if demo:
    demo_data(c)
    c.data.builder.text_rich = 1
    c.data.pp_train = f"decode|resize({size})|value_range(-1, 1)"  # no flip: it would mirror the text
    c.data.pp_eval = f"decode|resize({size})|value_range(-1, 1)"
    c.data.extra_text_keys = ("caption_detailed", "question", "answer")
    c.data.caption_key = "caption"
    c.data.question_regex = "text say"
    c.data.conversation = conversation(
      ("qa", "detailed"), image_tokens=views * queries, length=views * queries + 40, task_weights=(3.0, 1.0)
    )
    c.data.conversation.max_turns = 1
    c.init = demo_init("vision/img/")
    c.batch_size = 64
    c.total_steps = 800
    c.lr = 1e-3
    c.wd = 0.0
    c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=30))
    c.log_every = 25
    c.evals = vqa_eval(every=0)
  else:
    # Monkey's (Qwen-VL's) transform at 896: Resize((896, 896), BICUBIC), OpenAI CLIP mean/std; then windows.
    c.data.pp_train = f"decode|resize({size}, method='bicubic')|rescale|normalize('clip')"
    c.data.pp_eval = f"decode|resize({size}, method='bicubic')|rescale|normalize('clip')"
    c.data.extra_text_keys = ("caption_detailed", "question", "answer")
    c.data.conversation = conversation(("caption", "detailed", "qa"), image_tokens=views * queries, length=2048)
    c.data.conversation.specials = ml_collections.ConfigDict({"<image>": 151_859, "<|end|>": 151_643})
    c.init = ml_collections.ConfigDict(dict(path=None, mapping=None, step=None))  # an imported Qwen-VL
    # The architecture is the paper's; these optimiser settings are this codebase's choice for
    # fine-tuning a 7B VLM (AdamW, cosine), not restated from the paper: check them against it.
    c.batch_size = 1024
    c.total_steps = 56_250
    c.lr = 1e-5
    c.wd = 0.1
    c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=100))
    c.evals = vqa_eval(every=5000, max_examples=None)
  c.data.conversation.template = ml_collections.ConfigDict(TEMPLATE)
  c.data.conversation.instructions = ml_collections.ConfigDict(INSTRUCTIONS)
  c.data.conversation.question_format = "{question} Answer:"
  c.checkpoint_every = c.total_steps
  if not demo:
    c.model.dtype = "bfloat16"  # activations and matmuls; params, optimiser state, loss, norms stay float32
    c.attention_impl = "auto"  # cuDNN flash attention on GPU where shapes and dtypes allow, else XLA
  return c
