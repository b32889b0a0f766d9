r"""SigLIP B/16 (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").

Accelerator recipe (sec. 4): ViT-B/16 image tower with MAP pooling at 224 px, B text tower,
64 text tokens, 32k vocabulary, batch 32k, sigmoid loss with t' = log 10, b = -10, AdamW
with lr 1e-3, wd 1e-4 and b2 = 0.95 (the stabilising change of sec. 4.4), warmup + cosine.
On a pod, point `data.source` at your image-text data and `data.tokenizer` at a 32k
SentencePiece model:

  python -m vlm.train --config=configs/siglip_b16.py --workdir=/tmp/siglip_b16 \
      --config.data.source=tfds:NAME --config.data.tokenizer=/path/spm32k.model

`:demo` trains small towers on the embedded scenes on a 2-core CPU (about 8 minutes):

  python -m vlm.train --config=configs/siglip_b16.py:demo --workdir=/tmp/siglip_demo
"""

import math

import ml_collections

from configs.common import base_config, demo_data, demo_trainer, demo_two_tower


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.model_name = "two_tower"
  c.objective_name = "contrastive"
  c.objective = ml_collections.ConfigDict(dict(loss="sigmoid", impl="all_gather"))
  if arg == "demo":
    demo_data(c)
    c.model = demo_two_tower(temperature_init=math.log(10.0), bias_init=-10.0)
    demo_trainer(c)
    # The demo trains 1.5k steps, not ~300k: the temperature and bias get a 10x learning rate to
    # travel their range (at the init, scale 10 and bias -10, a positive logit is at most 0).
    c.lr_mults = (("t", 10.0), ("b", 10.0))
    return c
  if arg not in (None, ""):
    raise ValueError(f"configs/siglip_b16.py: unknown variant {arg!r}; known: demo")
  c.model = dict(
    # MLPs use the tanh-approximate GELU, as the published models do: big_vision's vit.py MlpBlock
    # calls flax `nn.gelu` (approximate=True by default); HF SiglipConfig says "gelu_pytorch_tanh".
    image=dict(variant="B/16", pool_type="map", posemb="learn", mlp_act="gelu_tanh"),
    text=dict(variant="B", vocab_size=32_000, max_len=64, pool_type="last", out_dim=768, mlp_act="gelu_tanh"),
    temperature_init=math.log(10.0),
    bias_init=-10.0,
  )
  c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  c.batch_size = 32_768
  c.total_steps = 9_000_000_000 // 32_768  # 9B seen examples
  c.lr = 1e-3
  c.wd = 1e-4
  c.optimizer_kw.b2 = 0.95
  c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=5_000))
  # SiglipImageProcessor: 224 x 224 bicubic (aspect not kept), mean/std 0.5, i.e. [-1, 1]; train as eval.
  c.data.pp_train = "decode|resize(224, method='bicubic')|rescale|normalize('siglip')"
  c.data.pp_eval = "decode|resize(224, method='bicubic')|rescale|normalize('siglip')"
  c.data.text_length = 64
  c.checkpoint_every = 1000
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
