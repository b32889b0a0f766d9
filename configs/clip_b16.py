r"""CLIP ViT-B/16 (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision").

Accelerator recipe (sec. 2.5 and Table 20): ViT-B/16 image tower with a class token and the
pre-encoder LayerNorm, 12-layer 512-wide causal text tower (EOS pooling, 77 tokens), 512-d
embeddings, softmax contrastive loss with temperature init 0.07 and the scale clamped at 100,
batch 32,768, Adam (b1 0.9, b2 0.98, eps 1e-6) with decoupled weight decay 0.2, lr 5e-4,
2,000 warmup steps then cosine, 32 epochs of 400M pairs.

  python -m vlm.train --config=configs/clip_b16.py --workdir=/tmp/clip_b16 \
      --config.data.source=tfds:NAME --config.data.tokenizer=/path/spm.model

`:demo` trains small towers on the embedded scenes on a 2-core CPU (about 8 minutes):

  python -m vlm.train --config=configs/clip_b16.py:demo --workdir=/tmp/clip_demo

Augmentation (off in every variant; vlm.data.augment, README "Augmentation"), e.g.:

  python -m vlm.train --config=configs/clip_b16.py:demo --workdir=/tmp/clip_demo_aug \
      --config.data.pp_train="decode|randaugment(2, 5, geometric=False)|resize(32)|flip_lr|synonyms(0.5)|\
value_range(-1, 1)" \
      --config.data.mixgen=0.1
"""

import ml_collections

from configs.common import base_config, demo_data, demo_trainer, demo_two_tower
from configs.defaults import CLIP_TEMPERATURE_INIT


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.model_name = "two_tower"
  c.objective_name = "contrastive"
  c.objective = ml_collections.ConfigDict(dict(loss="softmax", impl="all_gather"))
  if arg == "demo":
    demo_data(c)
    c.model = demo_two_tower(temperature_init=CLIP_TEMPERATURE_INIT, bias_init=None, max_scale=100.0)
    demo_trainer(c)
    c.lr_mults = (("t", 10.0),)  # 1.5k steps, not ~400k: let the temperature travel its range
    return c
  if arg not in (None, ""):
    raise ValueError(f"configs/clip_b16.py: unknown variant {arg!r}; known: demo")
  c.model = dict(
    image=dict(
      variant="B/16",
      class_token=True,
      pool_type="cls",
      pre_norm=True,
      patch_bias=False,
      out_dim=512,
      head_bias=False,
      norm_eps=1e-5,
      mlp_act="quick_gelu",
    ),
    text=dict(
      variant="M",
      vocab_size=49_408,
      max_len=77,
      causal=True,
      pool_type="eos",
      eos_id=1,
      out_dim=512,
      head_bias=False,
      norm_eps=1e-5,
      mlp_act="quick_gelu",
    ),
    temperature_init=CLIP_TEMPERATURE_INIT,
    bias_init=None,
    max_scale=100.0,
  )
  c.batch_size = 32_768
  c.total_steps = 32 * 400_000_000 // 32_768  # 32 epochs of 400M pairs
  c.optimizer_kw = ml_collections.ConfigDict(dict(b1=0.9, b2=0.98, eps=1e-6))
  c.lr = 5e-4
  c.wd = 0.2
  c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=2_000))
  # open_clip's training crop (RandomResizedCrop(224, scale=(0.9, 1), BICUBIC)); eval = CLIPImageProcessor
  # (shortest side 224 bicubic, centre crop 224, OpenAI CLIP mean/std; vlm.data.preprocess.REFERENCE_PP).
  c.data.pp_train = "decode|random_resized_crop(224, scale=(0.9, 1), method='bicubic')|normalize('clip')"
  c.data.pp_eval = "decode|resize_small(224, method='bicubic')|center_crop(224)|rescale|normalize('clip')"
  c.data.text_length = 77
  c.log_every = 100
  c.evals = ml_collections.ConfigDict(
    dict(
      zeroshot=dict(type="zeroshot", every=5000, split="test"),
      retrieval=dict(type="retrieval", every=5000, split="test"),
    )
  )
  c.model.dtype = "bfloat16"  # activations and matmuls; params, optimiser state, loss, norms stay float32
  c.attention_impl = "auto"  # cuDNN flash attention on GPU where shapes and dtypes allow, else XLA
  return c
