r"""Llip B/16 (Lavoie et al. 2024, "Modeling Caption Diversity in Contrastive Vision-Language Pretraining").

The image tower emits K = 32 learned mixture tokens; each caption's embedding is a query that
cross-attends over them (8 heads, softmax temperature 5, sec. 4), giving a caption-conditioned
image embedding per (image, caption) pair. Sigmoid loss with SigLIP's inits t' = log 10, b = -10,
through the shared all-device loss module. `objective.impl='ring'` passes the text side (queries
and caption embeddings) around the ring, so only [b, b] pair blocks exist; 'all_gather' builds
[b, B, D] conditioned embeddings per device and suits small batches only.

  python -m vlm.train --config=configs/llip_b16.py --workdir=/tmp/llip_b16 \
      --config.data.source=tfds:NAME --config.data.tokenizer=/path/spm32k.model

`:demo` trains small towers (K = 8 mixture tokens) on the embedded scenes on a 2-core CPU; zero-shot
and retrieval score with the conditioned embeddings (vlm.evals.contrastive):

  python -m vlm.train --config=configs/llip_b16.py:demo --workdir=/tmp/llip_demo
"""

import math

import ml_collections

from configs.common import base_config, demo_data, demo_trainer, demo_two_tower


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.model_name = "llip"
  c.objective_name = "contrastive"
  c.objective = ml_collections.ConfigDict(dict(loss="sigmoid", impl="ring"))
  if arg == "demo":
    demo_data(c)
    towers = demo_two_tower(temperature_init=math.log(10.0), bias_init=-10.0)
    del towers["image"]["pool_type"]  # Llip's tower is unpooled: its mixture tokens are the output
    c.model = dict(towers, num_mixture_tokens=8, num_heads=8, attn_temperature=5.0)
    c.objective.impl = "all_gather"  # batch 128: the [b, B, D] blocks are small
    demo_trainer(c)
    c.lr_mults = (("t", 10.0), ("b", 10.0))  # as the SigLIP demo: 1.5k steps, not ~300k
    return c
  if arg not in (None, ""):
    raise ValueError(f"configs/llip_b16.py: unknown variant {arg!r}; known: demo")
  c.model = dict(
    image=dict(variant="B/16", posemb="learn"),
    text=dict(variant="B", vocab_size=32_000, max_len=64, pool_type="last", out_dim=768),
    num_mixture_tokens=32,
    num_heads=8,
    attn_temperature=5.0,  # Llip sec. 4, B/16
    temperature_init=math.log(10.0),
    bias_init=-10.0,
  )
  c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  c.batch_size = 32_768
  c.total_steps = 9_000_000_000 // 32_768  # 9B seen examples, as the SigLIP B/16 recipe
  c.lr = 1e-3
  c.wd = 1e-4
  c.optimizer_kw.b2 = 0.95
  c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=5_000))
  c.data.pp_train = "decode|resize(224)|value_range(-1, 1)"
  c.data.pp_eval = "decode|resize(224)|value_range(-1, 1)"
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
