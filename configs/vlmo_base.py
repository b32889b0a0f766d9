r"""VLMo-Base (Bao et al. 2022, "VLMo: Unified Vision-Language Pre-Training with Mixture-of-Modality-Experts").

One MoME transformer (ViT-B layout: 12 layers, width 768, 12 heads, MLP 3072; VL-FFN in the top 2
layers; 224 px, 16 px patches; sec. 3.1) pretrained in three stages (sec. 2.3), each a config that
starts from the previous stage's checkpoint, then fine-tuned for VQA as answer classification:

  1. configs/vlmo_stage1_mim.py  image-only masked image modelling (BEiT): V-FFN + attention
  2. configs/vlmo_stage2_mlm.py  text-only masked language modelling: L-FFN, attention and V-FFN frozen
  3. configs/vlmo_base.py        (this file) image-text: ITC + ITM with global hard negatives + MLM
  4. configs/vlmo_vqa.py         fusion encoder + VQA classifier

Stage 3 recipe (sec. 3.1): batch 1024 (32 GPUs x 32), 200k steps, AdamW (beta2 0.98), peak lr
2e-4 with linear warmup and cosine decay, weight decay 0.01, text length 40. Point data.source at
image-text pairs and data.tokenizer at a WordPiece-sized SentencePiece model:

  python -m vlm.train --config=configs/vlmo_base.py --workdir=/tmp/vlmo/stage3 \
      --config.init.path=/tmp/vlmo/stage2 --config.data.source=tfds:NAME --config.data.tokenizer=/path/spm.model

`:demo` is the whole pipeline on the embedded scenes at 32 px on a 2-core CPU (a few minutes per
stage); each stage's default init.path is the previous stage's workdir below:

  python -m vlm.train --config=configs/vq_tokenizer.py:demo --workdir=/tmp/vq_demo
  python -m vlm.train --config=configs/vlmo_stage1_mim.py:demo --workdir=/tmp/vlmo_demo/stage1
  python -m vlm.train --config=configs/vlmo_stage2_mlm.py:demo --workdir=/tmp/vlmo_demo/stage2
  python -m vlm.train --config=configs/vlmo_base.py:demo --workdir=/tmp/vlmo_demo/stage3   # retrieval R@1
  python -m vlm.train --config=configs/vlmo_vqa.py:demo --workdir=/tmp/vlmo_demo/vqa       # VQA accuracy
"""

import ml_collections

from configs.common import base_config, demo_data, demo_trainer
from configs.defaults import CLIP_TEMPERATURE_INIT, scene_answer_vocab

DEMO_ROOT = "/tmp/vlmo_demo"
VQ_DEMO_WORKDIR = "/tmp/vq_demo"
TOKENIZER_VOCAB = 1000  # the embedded dataset's SentencePiece vocabulary; [MASK] = 1000 is one more row
# Stage 2 trains the text side only (sec. 2.3: "freeze the parameters of V-FFN and self-attention");
# the parameters stage 2 does not use are frozen too, so that weight decay leaves them alone.
STAGE2_FROZEN = [
  r"encoder/block_\d+/(norm1|attn|ls1|expert_v|expert_vl)/.*",
  r"(patch_embed|itc_image|itc_text|pooler|itm_head|mim_head|vqa_dense|vqa_norm|vqa_head)/.*",
  r"(cls_image|mask_token|pos_image|t)",
]


def model(demo: bool, **overrides) -> dict:
  """VLMo-Base, or the demo's 4-layer, 96-wide MoME (VL-FFN in the top 2) at 32 px."""
  if demo:
    m = dict(
      vocab_size=TOKENIZER_VOCAB + 1,
      width=96,
      depth=4,
      num_heads=4,
      mlp_dim=384,
      vl_layers=2,
      patch_size=8,
      image_size=32,
      max_len=16,
    )
  else:
    m = dict(
      vocab_size=30523,
      width=768,
      depth=12,
      num_heads=12,
      mlp_dim=3072,
      vl_layers=2,
      patch_size=16,
      image_size=224,
      max_len=40,
      droppath=0.1,
    )
  m.update(temperature_init=CLIP_TEMPERATURE_INIT, bias_init=None, max_scale=100.0, layer_scale=0.1)
  m.update(overrides)
  return m


# The command that makes each demo stage's init checkpoint (shown when it is missing).
PREVIOUS = {
  "mim": "python -m vlm.train --config=configs/vq_tokenizer.py:demo --workdir=/tmp/vq_demo",
  "mlm": f"python -m vlm.train --config=configs/vlmo_stage1_mim.py:demo --workdir={DEMO_ROOT}/stage1",
  "pairs": f"python -m vlm.train --config=configs/vlmo_stage2_mlm.py:demo --workdir={DEMO_ROOT}/stage2",
  "vqa": f"python -m vlm.train --config=configs/vlmo_base.py:demo --workdir={DEMO_ROOT}/stage3",
}


def stage_config(stage: str, arg: str | None, init_path: str | None) -> ml_collections.ConfigDict:
  """The config of one stage ('mim', 'mlm', 'pairs', 'vqa'); arg None (the paper) or 'demo'."""
  if arg not in (None, "", "demo"):
    raise ValueError(f"VLMo configs: unknown variant {arg!r}; known: demo")
  demo = arg == "demo"
  c = base_config()
  c.model_name = "vlmo"
  c.objective_name = "vlmo"
  c.objective = ml_collections.ConfigDict(
    dict(
      itc_weight=1.0,
      itm_weight=1.0,
      mlm_weight=1.0,
      mim_weight=0.0,
      mlm_with_image=True,
      mask_id=TOKENIZER_VOCAB if demo else 30522,
      mask_rate=0.15,
      mim_ratio=0.4,
      mim_masking="blockwise",
      itm_hard_negatives=True,
      loss="softmax",
    )
  )
  c.model = model(demo)
  c.init.path = init_path
  if demo:
    c.init.hint = f"Run the previous stage first: {PREVIOUS[stage]}"
  if demo:
    demo_data(c)
    c.data.add_bos = True  # BOS is the text [CLS]
    # A stage-3 step runs the fusion encoder on 4 sequences per pair (ITM positive, two hard
    # negatives, MLM) of 33 tokens: ~6x a CLIP-demo step at batch 128, hence batch 64.
    demo_trainer(c, steps=800)
    c.batch_size = 64
    # Canonical captions ("a large red circle on the left"), which retrieval is scored on: with the
    # varied phrasings ("a red circle."), the hardest ITM negatives are paraphrases or captions that
    # also fit the image, and at 600 steps image->text R@1 was 32% (hard-negative ITM at chance).
    c.data.caption_key = "caption"
    c.lr_mults = (("t", 10.0),)  # as the CLIP demo: the temperature must move far in few steps
  else:
    c.data.pp_train = "decode|random_resized_crop(224, scale=(0.5, 1))|flip_lr|value_range(-1, 1)"
    c.data.pp_eval = "decode|resize(224)|value_range(-1, 1)"
    c.data.text_length = 40
    c.data.add_bos = True
    c.batch_size = 1024
    c.total_steps = 200_000
    c.optimizer_kw.b2 = 0.98
    c.lr = 2e-4
    c.wd = 0.01
    c.schedule.warmup_steps = 2500
    c.evals = ml_collections.ConfigDict(
      dict(
        zeroshot=dict(type="zeroshot", every=10_000, split="test"),
        retrieval=dict(type="retrieval", every=10_000, split="test"),
      )
    )

  if stage == "mim":
    c.objective.update(itc_weight=0.0, itm_weight=0.0, mlm_weight=0.0, mim_weight=1.0)
    vq = _vq_tokenizer(demo)
    c.model.update(tokenizer=vq, codebook_size=vq["codebook_size"])
    c.init.mapping = {"tokenizer/": ""}  # only the tokenizer comes from init.path
    c.frozen = (r"tokenizer/.*",)
    c.evals = ml_collections.ConfigDict()
    if demo:
      c.objective.mim_masking = "random"  # a 4x4 grid is too small for BEiT's blocks of >= 4 patches
      c.total_steps = 200
  elif stage == "mlm":
    c.objective.update(itc_weight=0.0, itm_weight=0.0, mlm_weight=1.0, mlm_with_image=False)
    c.frozen = list(STAGE2_FROZEN)
    c.evals = ml_collections.ConfigDict()
    if demo:
      c.total_steps = 200
  elif stage == "vqa":
    _vqa(c, demo)
  elif stage != "pairs":
    raise ValueError(f"unknown VLMo stage {stage!r}")
  if demo and stage == "pairs":
    c.evals.zeroshot.every = c.evals.retrieval.every = 400
  if not demo:
    c.model.dtype = "bfloat16"  # activations and matmuls; params, optimiser state, loss, norms stay float32
    c.attention_impl = "auto"  # cuDNN flash attention on GPU where shapes and dtypes allow, else XLA
  return c


def _vq_tokenizer(demo: bool) -> dict:
  from configs import vq_tokenizer

  return dict(vq_tokenizer.get_config("demo" if demo else None).model)


def _vqa(c: ml_collections.ConfigDict, demo: bool) -> None:
  """VQA as classification over data.answer_vocab with the fusion encoder on [question; image]."""
  c.objective_name = "classification"
  c.objective = ml_collections.ConfigDict(
    dict(input_key=("image", "question"), label_key="answer_label", method="vqa_logits")
  )
  c.data.extra_text_keys = ("question",)
  answers = scene_answer_vocab()
  c.data.answer_vocab = answers
  c.model.num_answers = len(answers)
  c.evals = ml_collections.ConfigDict(
    dict(
      vqa=dict(
        type="classify",
        every=0,
        split="test",
        input_key=("image", "question"),
        label_key="answer_label",
        method="vqa_logits",
      )
    )
  )
  if demo:
    c.total_steps = 400
    c.evals.vqa.every = 200
  else:
    # Our starting point for VQA v2 (about 10 epochs at batch 128, small lr); not the paper's exact schedule.
    c.batch_size, c.total_steps, c.lr, c.wd = 128, 40_000, 3e-5, 0.01


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return stage_config("pairs", arg, f"{DEMO_ROOT}/stage2" if arg == "demo" else None)
