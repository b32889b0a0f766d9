r"""Chameleon-style early fusion (Chameleon Team 2024): VQ image tokens and text in one decoder.

Images become the codes of a VQ tokenizer (8192 codes, 16x downsampling: 1024 tokens for 512 px;
sec. 2.1), shifted into the vocabulary after the text and framed by begin/end-of-image markers.
One decoder with qk-norm (sec. 2.3) and z-loss 1e-5 (sec. 2.3) learns the mixed-modal rows by
next-token prediction, both orders of each pair: [image, caption] and [caption, image]
(vlm.models.early_fusion, vlm.objectives.early_fusion). The tokenizer is trained first with
configs/vq_tokenizer.py and frozen. The full recipe is the 7B decoder (sec. 2.3, Table 1: 32
layers, width 4096, 32 heads, 4k context); note our tokenizer is the ViT-VQGAN of
configs/vq_tokenizer.py, not Chameleon's convolutional Make-A-Scene VQGAN, and the 65,536-token
BPE vocabulary becomes 57,344 text ids + 8192 codes here:

  python -m vlm.train --config=configs/chameleon.py --workdir=/tmp/chameleon \
      --config.data.source=tfds:NAME --config.data.tokenizer=/path/bpe57k.model \
      --config.init.path=/tmp/vq  # the trained tokenizer (mapping 'tokenizer/' -> '')

`:demo` on a 2-core CPU, after the tokenizer demo (4 x 4 = 16 codes of 512 per 32 px image) and,
as the judge of the generated images, the Llip demo (configs/llip_b16.py:demo):

  python -m vlm.train --config=configs/vq_tokenizer.py:demo_long --workdir=/tmp/vq_demo_long
  python -m vlm.train --config=configs/llip_b16.py:demo --workdir=/tmp/llip_demo
  python -m vlm.train --config=configs/chameleon.py:demo --workdir=/tmp/chameleon_demo

It evaluates, at step 0 (the untrained decoder) and at the end: captions generated from the
image tokens (exact match, BLEU, CIDEr) and text-to-image: image tokens generated from the test
captions (classifier-free guidance 2), rendered by the tokenizer and classified by the judge
(colour and shape must match the prompt's; vlm.evals.text_to_image). About 28 minutes on 2 cores.
"""

import ml_collections

from configs.common import base_config, demo_data, demo_trainer
from configs.lm_pretrain import demo_lm

# Demo vocabulary: text ids 0..999, then the markers, then the 512 codes of the demo tokenizer.
DEMO_BOI, DEMO_EOI = 1000, 1001
DEMO_IMAGE_OFFSET = 1008
VQ_DEMO = "/tmp/vq_demo_long"
JUDGE_DEMO = "/tmp/llip_demo"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.model_name = "early_fusion"
  c.objective_name = "early_fusion"
  c.objective = ml_collections.ConfigDict(dict(image_first_prob=0.5, z_loss=1e-5, image_weight=1.0))
  c.frozen = ("tokenizer/.*",)
  c.init = ml_collections.ConfigDict(dict(path=None, mapping={"tokenizer/": ""}, step=None))
  if arg == "demo":
    return _demo(c)
  if arg not in (None, ""):
    raise ValueError(f"configs/chameleon.py: unknown variant {arg!r}; known: demo")
  c.model = dict(
    lm=dict(
      vocab_size=65_536,
      width=4096,
      depth=32,
      num_heads=32,
      mlp_dim=11_008,
      mlp_act="swiglu",
      rope_theta=10_000.0,
      norm_eps=1e-5,
      qk_norm="layer_per_head",
      tie_embeddings=False,
      scan_layers=True,
      remat_policy="dots",
    ),  # one compiled block for the 32 (vlm.models.decoder)
    tokenizer=dict(width=512, depth=8, mlp_dim=2048, num_heads=8, patch_size=16, codebook_size=8192, code_dim=32),
    image_token_offset=65_536 - 8192,
    boi_id=8197,
    eoi_id=8196,
  )
  c.mesh = [("data", -1), ("fsdp", 8), ("tensor", 1)]
  c.batch_size = 1024
  c.total_steps = 200_000
  c.lr = 1e-4  # sec. 2.3 (7B): AdamW b1 0.9, b2 0.95, eps 1e-5, wd 0.1, grad clip 1.0
  c.wd = 0.1
  c.optimizer_kw = ml_collections.ConfigDict(dict(b1=0.9, b2=0.95, eps=1e-5))
  c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=4000))
  c.data.pp_train = "decode|resize(512)|value_range(-1, 1)"
  c.data.pp_eval = "decode|resize(512)|value_range(-1, 1)"
  c.data.text_length = 256
  c.checkpoint_every = 1000
  c.log_every = 100
  c.model.dtype = "bfloat16"  # activations and matmuls; params, optimiser state, loss, norms stay float32
  c.attention_impl = "auto"  # cuDNN flash attention on GPU where shapes and dtypes allow, else XLA
  return c


def _demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  demo_data(c)
  lm = demo_lm()
  lm.update(vocab_size=DEMO_IMAGE_OFFSET + 512, qk_norm="layer_per_head")
  c.model = dict(
    lm=lm,
    # configs/vq_tokenizer.py:demo_long's tokenizer, loaded from its run.
    tokenizer=dict(width=128, depth=2, mlp_dim=256, num_heads=4, patch_size=8, codebook_size=512, code_dim=32),
    image_token_offset=DEMO_IMAGE_OFFSET,
    boi_id=DEMO_BOI,
    eoi_id=DEMO_EOI,
  )
  c.init.path = VQ_DEMO
  # 5000 steps, 85% of the rows text-first: the decoder's drawing is what limits the demo, not its
  # captions. With 2000 steps half and half, 24.2% of the generated images matched the prompt, and
  # experiments/t2i_probe.py showed blobs (shape read right 25% of the time, 57% on the tokenizer's
  # reconstructions); 3000 steps at 25% image-first: 39.2%; these settings: 44.8%, 50.8% with
  # classifier-free guidance 2 (chosen on the validation split: 1 -> 42.8%, 1.5 -> 44.8%, 2 -> 49.2%,
  # 2.5 -> 49.0%, 3 -> 39.6%). README, "Early fusion".
  c.objective.image_first_prob = 0.15
  demo_trainer(c, steps=5000)
  c.batch_size = 64
  c.eval_at_start = True  # the untrained decoder's captions and images, logged as step 0
  c.evals = ml_collections.ConfigDict(
    dict(
      captioning=dict(
        type="captioning",
        every=5000,
        split="test",
        max_examples=500,
        method="greedy",
        reference_keys=("caption", "caption_varied"),
      ),
      text_to_image=dict(
        type="text_to_image",
        every=5000,
        split="test",
        max_examples=500,
        judge=JUDGE_DEMO,
        method="greedy",
        guidance=2.0,
      ),
    )
  )
  return c
