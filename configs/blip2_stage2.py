r"""BLIP-2 stage 2 (Li et al. 2023, sec. 3.3): vision-to-language generative learning. The frozen image
encoder and the stage-1 Q-Former give 32 query outputs; a fully-connected layer projects them to
the LLM's width, and they are written at the `<image>` placeholders (a soft visual prompt in front
of the text); the LLM is frozen. The Q-Former and the projection learn; the loss is the language
modelling loss on the text after the prompt (vlm.models.vision_lm with vision_model='blip2_qformer').

  python -m vlm.train --config=configs/lm_pretrain.py:demo --workdir=/tmp/vlm_lm_demo
  python -m vlm.train --config=configs/blip2_stage1.py:demo --workdir=/tmp/blip2_demo
  python -m vlm.train --config=configs/blip2_stage2.py:demo --workdir=/tmp/blip2_demo/stage2

The demo mixes captions (the paper's stage-2 data) with question/answer chats: BLIP-2 fine-tunes
for VQA in a separate step with the LLM frozen (sec. 4.3); one run keeps the demo short. As in
that fine-tuning, the Q-Former is question-conditioned (instruction-aware, as InstructBLIP): the
user's instruction goes to the Q-Former beside the queries (data.conversation.instruction_length),
so the queries extract what the question asks about. It reports `vqa/accuracy` (exact match of
greedy answers) on the test split.

Demo result (2026-11-24, 800 steps, 9 min 27 s on 2 cores): 68.7% exact match (held-out object
combinations 59.8%). By question type: colour 99%, size 99%, count 61%, position 48%, shape 46%,
text 4%. Without the instruction (queries alone) the same recipe gave 44.0% (colour 15%, shape
15%): the frozen 0.9M-parameter demo LM barely reads a generic soft visual prompt (LLaVA after its
stage 1, LM frozen, scores 15% too), while question-conditioned queries hand it the answer.

MiniGPT-4 (Zhu et al. 2023, sec. 3) is this model with the Q-Former frozen too, so that only the
single projection layer learns: `configs/blip2_stage2.py:minigpt4` (`:minigpt4_demo`).
"""

import ml_collections

from configs import blip2_stage1, llava_base
from configs.lm_pretrain import conversation

BLIP2_DEMO = "/tmp/blip2_demo"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "demo", "minigpt4", "minigpt4_demo"):
    raise ValueError(f"configs/blip2_stage2.py: unknown variant {arg!r}; known: demo, minigpt4, minigpt4_demo")
  minigpt4 = bool(arg) and arg.startswith("minigpt4")
  demo = bool(arg) and arg.endswith("demo")
  arg = "demo" if demo else None
  c = llava_base.stage_config("align", arg)  # LM, data and chat template as the LLaVA recipe
  stage1 = blip2_stage1.get_config(arg).model
  queries = int(stage1.num_query_tokens)
  c.model = dict(
    lm_config=c.model.lm_config.to_dict(),
    vision_model="blip2_qformer",
    vision_config=dict(stage1.to_dict(), freeze_image=True),
    vision_method="query_features",
    connector_type="linear",
    image_token_id=c.model.image_token_id,
  )
  # Frozen: the image encoder, the LLM, and the stage-1 parameters that exist without being used
  # here (ITC temperature, ITG bias). Modules generation never calls (text embeddings, text FFNs,
  # ITC/ITM heads) are not instantiated, so their stage-1 weights are simply not loaded.
  c.frozen = (r"vision/img/.*", r"lm/.*", r"vision/(lm_bias|t)")
  if minigpt4:  # the whole BLIP-2 visual side (ViT + Q-Former) frozen; one linear layer learns
    c.frozen = (r"vision/.*", r"lm/.*")
  c.init = ml_collections.ConfigDict(
    dict(
      vision=dict(
        path=BLIP2_DEMO if demo else None,
        mapping={"vision/": ""},
        step=None,
        hint=f"Run BLIP-2 stage 1 first: python -m vlm.train --config=configs/blip2_stage1.py:demo "
        f"--workdir={BLIP2_DEMO}",
      ),
      lm=c.init.lm,
    )
  )
  if demo:
    # Instruction-aware Q-Former (sec. 4.3: for VQA "the question tokens are given as input to the
    # Q-Former and interact with the queries via the self-attention layers"; InstructBLIP): the
    # Q-Former's text side (word embeddings, text FFNs) trains here too. 16 = its max_len.
    c.data.conversation = conversation(
      ("caption", "qa"),
      image_tokens=queries,
      length=72,
      task_weights=(1.0, 3.0),
      instruction_length=0 if minigpt4 else 16,
    )
    c.data.caption_key = "caption"
    c.total_steps = 800
    c.lr = 1e-3
    c.schedule.warmup_steps = 30
  else:  # sec. 3.4: 80k steps at batch 1920 (OPT) / 1520 (FlanT5), lr 1e-4, wd 0.05
    c.data.conversation.update(
      tasks=("caption",),
      image_tokens=queries,
      prompt_length=c.data.conversation.prompt_length - c.data.conversation.image_tokens + queries,
    )
    # BLIP-2's 224 px EVA ViT-g, not LLaVA's 336: LAVIS's train crop (MiniGPT-4's has no flip); eval =
    # BlipImageProcessor (Blip2Processor: 224 x 224 bicubic, OpenAI CLIP mean/std).
    c.data.pp_train = (
      "decode|random_resized_crop(224, scale=(0.5, 1), method='bicubic')|"
      + ("" if minigpt4 else "flip_lr|")
      + "normalize('clip')"
    )
    c.data.pp_eval = "decode|resize(224, method='bicubic')|rescale|normalize('clip')"
    c.batch_size = 1920
    c.total_steps = 80_000
    c.lr = 1e-4
    c.wd = 0.05
    c.schedule.warmup_steps = 2000
  if not demo:
    c.model.dtype = "bfloat16"  # activations and matmuls; params, optimiser state, loss, norms stay float32
    c.attention_impl = "auto"  # cuDNN flash attention on GPU where shapes and dtypes allow, else XLA
  c.checkpoint_every = c.total_steps
  return c
