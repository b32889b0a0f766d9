r"""LiT: locked-image text tuning (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning").

A pre-trained image tower is loaded and frozen (its weights get no update and no optimiser
state, and it runs in inference mode); only the text tower and the temperature learn, with the
contrastive softmax loss. Recipe (sec. 4, 5): B/16 image tower, B text tower, batch 16,384,
lr 1e-3, wd 1e-4, warmup 10k steps + cosine. Point `init.path` at a workdir of ours or an HF
CLIP/SigLIP directory:

  python -m vlm.train --config=configs/lit_b16.py --workdir=/tmp/lit_b16 \
      --config.init.path=/path/to/pretrained --config.data.source=tfds:NAME

`:demo` locks the image tower of a SigLIP demo run and trains a new text tower (about 5 minutes):

  python -m vlm.train --config=configs/siglip_b16.py:demo --workdir=/tmp/siglip_demo
  python -m vlm.train --config=configs/lit_b16.py:demo --workdir=/tmp/lit_demo \
      --config.init.path=/tmp/siglip_demo
"""

import ml_collections

from configs.common import base_config, demo_data, demo_two_tower
from configs.defaults import CLIP_TEMPERATURE_INIT


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.model_name = "two_tower"
  c.objective_name = "contrastive"
  c.objective = ml_collections.ConfigDict(dict(loss="softmax", impl="all_gather"))
  c.frozen = (r"img/.*",)  # no update, no optimiser state
  c.init = ml_collections.ConfigDict(
    dict(path=ml_collections.config_dict.placeholder(str), mapping={"img/": "img/"}, step=None)
  )
  if arg == "demo":
    demo_data(c)
    c.model = demo_two_tower(temperature_init=CLIP_TEMPERATURE_INIT, bias_init=None, max_scale=100.0)
    c.model["frozen"] = ("image",)
    c.batch_size = 128
    c.total_steps = 600
    c.lr = 1e-3
    c.schedule.warmup_steps = 50
    c.log_every = 25
    c.checkpoint_every = 200
    c.evals.zeroshot.every = 300
    c.evals.retrieval.every = 300
    return c
  if arg not in (None, ""):
    raise ValueError(f"configs/lit_b16.py: unknown variant {arg!r}; known: demo")
  c.model = dict(
    image=dict(variant="B/16", pool_type="map"),
    text=dict(variant="B", vocab_size=32_000, max_len=16, pool_type="last", out_dim=768),
    temperature_init=CLIP_TEMPERATURE_INIT,
    bias_init=None,
    frozen=("image",),
  )
  c.batch_size = 16_384
  c.total_steps = 18_000_000_000 // 16_384  # 18B seen examples (sec. 5)
  c.lr = 1e-3
  c.wd = 1e-4
  c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=10_000))
  # The locked tower's own preprocessing: SiglipImageProcessor for a SigLIP (MAP-pooled) tower; for an
  # HF CLIP tower use CLIPImageProcessor's (vlm.data.preprocess.reference_pp('clip', 224)).
  c.data.pp_train = "decode|resize(224, method='bicubic')|rescale|normalize('siglip')"
  c.data.pp_eval = "decode|resize(224, method='bicubic')|rescale|normalize('siglip')"
  c.data.text_length = 16
  c.evals = ml_collections.ConfigDict(
    dict(
      zeroshot=dict(type="zeroshot", every=5000, split="test"),
      retrieval=dict(type="retrieval", every=5000, split="test"),
    )
  )
  c.model.dtype = "bfloat16"  # activations and matmuls; params, optimiser state, loss, norms stay float32
  c.attention_impl = "auto"  # cuDNN flash attention on GPU where shapes and dtypes allow, else XLA
  return c
