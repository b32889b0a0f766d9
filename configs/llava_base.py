r"""LLaVA-1.5 (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning"): CLIP ViT features
of the penultimate layer (CLS dropped) -> MLP connector (Linear-GELU-Linear) -> image tokens at the
`<image>` placeholders of a chat -> a decoder-only LM. Two stages (sec. 3 of LLaVA, Liu et al. 2023a):

  stage 1, feature alignment: image -> brief caption; only the connector learns
      (configs/llava_stage1.py)
  stage 2, visual instruction tuning: multi-turn question/answer chats and detailed descriptions;
      the connector and the LM learn, the vision encoder stays frozen (configs/llava_stage2.py)

Demo pipeline on the embedded dataset (no weights can be downloaded here, so the "pretrained"
vision encoder is the CLIP demo's image tower and the LM is configs/lm_pretrain.py's):

  python -m vlm.train --config=configs/clip_b16.py:demo --workdir=/tmp/clip_demo
  python -m vlm.train --config=configs/lm_pretrain.py:demo --workdir=/tmp/vlm_lm_demo
  python -m vlm.train --config=configs/llava_stage1.py:demo --workdir=/tmp/llava_demo/stage1
  python -m vlm.train --config=configs/llava_stage2.py:demo --workdir=/tmp/llava_demo/stage2
  python -m vlm.predict --workdir=/tmp/llava_demo/stage2 --image=PATH --prompt="what colour is the large star?"

Parameter-efficient stage 2 (vlm.peft; the connector trains too):

  LoRA:           --config.peft.method=lora "--config.peft.targets=('lm/.*attn/(query|key|value|out)',)"
                  "--config.peft.train_also=('connector/.*',)"
  prompt tuning:  --config.model.num_soft_prompts=8 --config.data.conversation.soft_prompts=8
                  "--config.trainable=('soft_prompt', 'connector/.*')"

Stage 2 reports `vqa/accuracy`: exact match of greedy answers on the test split (one drawn question
per image). At scale (no `:demo`), init.vision.path takes an HF CLIP directory (ViT-L/14-336) and
init.lm.path an HF Llama / Vicuna directory; both are imported by vlm.checkpoint.load_params.
"""

import ml_collections

from configs.common import base_config, demo_data
from configs.lm_pretrain import conversation, demo_lm

DEMO_ROOT = "/tmp/llava_demo"
CLIP_DEMO = "/tmp/clip_demo"
LM_DEMO = "/tmp/vlm_lm_demo"


def demo_vision() -> dict:
  """The CLIP demo's image tower (configs/common.demo_two_tower) without its MAP head."""
  return dict(width=128, depth=4, mlp_dim=512, num_heads=4, patch_size=8)


def demo_init(vision_prefix: str = "vision/", demo: bool = True) -> ml_collections.ConfigDict:
  """config.init of a demo VLM: the CLIP demo's image tower (its 'img/' params) at `vision_prefix` and
  the LM demo at 'lm/'. demo=False: the same two slots with no path (give HF directories)."""
  return ml_collections.ConfigDict(
    dict(
      vision=dict(
        path=CLIP_DEMO if demo else None,
        mapping={vision_prefix: "img/" if demo else ""},
        step=None,
        hint=f"Train the vision encoder first: python -m vlm.train --config=configs/clip_b16.py:demo "
        f"--workdir={CLIP_DEMO}",
      ),
      lm=dict(
        path=LM_DEMO if demo else None,
        mapping={"lm/": ""},
        step=None,
        hint=f"Train the LM first: python -m vlm.train --config=configs/lm_pretrain.py:demo --workdir={LM_DEMO}",
      ),
    )
  )


def vicuna_chat(conv: ml_collections.ConfigDict) -> None:
  """Vicuna v1's template, specials and system prompt on data.conversation (LLaVA-1.5 / LLaVA-NeXT at
  scale; the tokenizer must be the LM's own: data.tokenizer = its tokenizer.model)."""
  conv.template = ml_collections.ConfigDict(
    dict(
      system="{content} ", user="USER: {content} ", assistant="ASSISTANT: {content}</s>", generation_prefix="ASSISTANT:"
    )
  )
  conv.specials = ml_collections.ConfigDict({"<image>": 32_000, "</s>": 2})
  conv.system = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions."
  )


def vqa_eval(every: int, max_examples: int | None = 1000) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(vqa=dict(type="vqa_generate", every=every, split="test", max_examples=max_examples, max_new_tokens=6))
  )


def model(demo: bool) -> dict:
  if demo:
    return dict(
      lm_config=demo_lm(),
      vision_config=demo_vision(),
      feature_layer=-2,
      keep_cls=False,
      connector_type="mlp",
      image_token_id=1000,
      soft_prompt_token_id=1004,
      num_soft_prompts=0,
    )
  # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 image tokens), Vicuna-7B v1.5 (Llama-2 architecture).
  return dict(
    lm_config=dict(
      vocab_size=32_064,
      width=4096,
      depth=32,
      num_heads=32,
      mlp_dim=11_008,
      mlp_act="swiglu",
      rope_theta=10_000.0,
      norm_eps=1e-5,
      tie_embeddings=False,
      # one compiled block for the 32 (vlm.models.decoder), matmul outputs kept for the backward
      scan_layers=True,
      remat_policy="dots",
    ),
    vision_config=dict(
      variant="L/14", class_token=True, pre_norm=True, patch_bias=False, norm_eps=1e-5, mlp_act="quick_gelu"
    ),
    feature_layer=-2,
    keep_cls=False,
    connector_type="mlp",
    image_token_id=32_000,
  )


def stage_config(stage: str, arg: str | None) -> ml_collections.ConfigDict:
  """Stage 'align' (1) or 'instruct' (2); arg None (LLaVA-1.5-7B) or 'demo'."""
  if arg not in (None, "", "demo"):
    raise ValueError(f"LLaVA configs: unknown variant {arg!r}; known: demo")
  demo = arg == "demo"
  c = base_config()
  c.model_name = "vision_lm"
  c.model = model(demo)
  c.objective_name = "lm"
  c.objective = ml_collections.ConfigDict(dict(image_key="image"))
  c.wd = 0.0  # LLaVA-1.5 Table 9
  c.grad_clip_norm = 1.0
  if demo:
    demo_data(c)
    c.data.extra_text_keys = ("caption_detailed", "question", "answer")
    c.data.caption_key = "caption"
    tokens = (32 // 8) ** 2
    tasks = ("caption",) if stage == "align" else ("qa", "detailed")
    c.data.conversation = conversation(
      tasks, image_tokens=tokens, length=96, task_weights=None if stage == "align" else (3.0, 1.0)
    )
    c.batch_size = 64
    c.log_every = 25
    c.evals = vqa_eval(every=0)
  else:
    # LLaVA-1.5 stage 2 (scripts/v1_5/finetune.sh: image_aspect_ratio 'pad') and its released model:
    # expand2square with the CLIP mean colour, then CLIPImageProcessor at 336 (= LlavaImageProcessor(do_pad=True)).
    # Stage 1 (scripts/v1_5/pretrain.sh, no pad): CLIPImageProcessor at 336 alone.
    c.data.pp_train = c.data.pp_eval = (
      "decode|pad_to_square('clip')|resize_small(336, method='bicubic')|center_crop(336)|rescale|normalize('clip')"
      if stage != "align"
      else "decode|resize_small(336, method='bicubic')|center_crop(336)|rescale|normalize('clip')"
    )
    c.data.extra_text_keys = ("caption_detailed", "question", "answer")
    c.data.conversation = conversation(
      ("caption",) if stage == "align" else ("qa", "detailed"), image_tokens=576, length=2048
    )
    vicuna_chat(c.data.conversation)
    c.evals = vqa_eval(every=5000, max_examples=None)
  if stage == "align":
    # Stage 1: vision encoder and LM frozen, the connector learns (LLaVA-1.5: batch 256, lr 1e-3, 1 epoch).
    c.frozen = (r"vision/.*", r"lm/.*")
    c.init = demo_init(demo=demo)
    c.lr = 1e-3
    c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=20 if demo else 65))
    c.total_steps = 300 if demo else 2170  # 558k LCS-558K pairs / 256
    if not demo:
      c.batch_size = 256
  elif stage == "instruct":
    # Stage 2: the connector and the LM learn, the vision encoder stays frozen (LLaVA-1.5: batch 128, lr 2e-5).
    c.frozen = (r"vision/.*",)
    c.init = ml_collections.ConfigDict(
      dict(
        path=f"{DEMO_ROOT}/stage1" if demo else None,
        mapping=None,
        step=None,
        hint=f"Run stage 1 first: python -m vlm.train --config=configs/llava_stage1.py:demo "
        f"--workdir={DEMO_ROOT}/stage1",
      )
    )
    c.lr = 1e-3 if demo else 2e-5
    c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=30 if demo else 156))
    c.total_steps = 800 if demo else 5197  # 665k instruction examples / 128
    if not demo:
      c.batch_size = 128
  else:
    raise ValueError(f"unknown LLaVA stage {stage!r}")
  if not demo:
    c.model.dtype = "bfloat16"  # activations and matmuls; params, optimiser state, loss, norms stay float32
    c.attention_impl = "auto"  # cuDNN flash attention on GPU where shapes and dtypes allow, else XLA
  c.checkpoint_every = c.total_steps
  return c
