r"""CoCa-Base (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models").

Accelerator recipe (sec. 4.1, Table 1): ViT-B image encoder (12 layers, 768 wide, 12 heads) at
288 px with 18 px patches; text decoder of 12 unimodal + 12 multimodal layers (768 wide, MLP 3072,
12 heads); attentional poolers with 256 queries (captioner) and 1 query (contrastive);
loss weights lambda_Cap = 2.0, lambda_Con = 1.0; batch 65,536 for 500k steps; Adafactor with
beta1 0.9 and decoupled weight decay 0.01; lr warmed up over the first 2% of steps to 8e-4, then
decayed linearly. (The paper caps Adafactor's second-moment decay at beta2 = 0.999; optax's
factored RMS follows 1 - t^-0.8, which passes 0.999 after about 5.6k steps.) Point `data.source`
at your image-text data and `data.tokenizer` at a 64k SentencePiece model:

  python -m vlm.train --config=configs/coca_b16.py --workdir=/tmp/coca_b16 \
      --config.data.source=tfds:NAME --config.data.tokenizer=/path/spm64k.model

`:demo` trains a small CoCa on the embedded scenes on a 2-core CPU (about 12 minutes) and reports
zero-shot top-1, retrieval and captioning BLEU-4 / CIDEr on the test split:

  python -m vlm.train --config=configs/coca_b16.py:demo --workdir=/tmp/coca_demo
  python -m vlm.predict --workdir=/tmp/coca_demo --image=my.png          # prints a caption

`:video_demo` classifies the direction of motion of the embedded clips (4 frames) with CoCa's
video protocol: every frame through the shared image encoder, all frame tokens pooled by an
attentional pooler (plus a learned per-frame embedding, without which pooling ignores frame
order). On real data, `--config.init.path=WORKDIR` with `init.mapping={'img/': 'img/'}` starts
from a trained CoCa image encoder of the same shape:

  python -m vlm.train --config=configs/coca_b16.py:video_demo --workdir=/tmp/coca_video
"""

import ml_collections

from configs.common import base_config, demo_data, demo_trainer
from configs.defaults import CLIP_TEMPERATURE_INIT

placeholder = ml_collections.config_dict.placeholder


def caption_evals(every: int, max_examples: int | None = None) -> dict:
  """Captioning (BLEU-4, CIDEr against the canonical and varied captions) on the test split."""
  return dict(
    type="captioning",
    every=every,
    split="test",
    method="greedy",
    reference_keys=("caption", "caption_varied"),
    max_examples=max_examples,
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.model_name = "coca"
  c.objective_name = "coca"
  # Paper weights (sec. 4.1); softmax contrastive loss across all data devices.
  c.objective = ml_collections.ConfigDict(
    dict(contrastive_weight=1.0, caption_weight=2.0, loss="softmax", impl="all_gather", pad_id=0)
  )
  if arg == "demo":
    return _demo(c)
  if arg == "video_demo":
    return _video_demo(c)
  if arg not in (None, ""):
    raise ValueError(f"configs/coca_b16.py: unknown variant {arg!r}; known: demo, video_demo")
  c.model = dict(
    image=dict(variant="B/18", posemb="learn"),
    text=dict(variant="B", vocab_size=64_000, max_len=64),
    embed_dim=768,
    num_cap_queries=256,
    num_con_queries=1,
    temperature_init=CLIP_TEMPERATURE_INIT,
    bias_init=None,
    max_scale=100.0,
  )
  c.batch_size = 65_536
  c.total_steps = 500_000
  c.optimizer = "adafactor"
  c.optimizer_kw = ml_collections.ConfigDict(dict(b1=0.9, decay_rate=0.8, eps=1e-30))
  c.lr = 8e-4
  c.wd = 0.01
  c.schedule = ml_collections.ConfigDict(dict(name="warmup_linear", warmup_steps=10_000))  # 2% of 500k
  c.data.pp_train = "decode|resize(288)|value_range(-1, 1)"
  c.data.pp_eval = "decode|resize(288)|value_range(-1, 1)"
  c.data.text_length = 64
  c.data.add_bos = True  # the captioner predicts w1 from BOS
  c.log_every = 100
  c.evals = ml_collections.ConfigDict(
    dict(
      zeroshot=dict(type="zeroshot", every=10_000, split="test"),
      retrieval=dict(type="retrieval", every=10_000, split="test"),
      captioning=caption_evals(every=10_000),
    )
  )
  c.model.dtype = "bfloat16"  # activations and matmuls; params, optimiser state, loss, norms stay float32
  c.attention_impl = "auto"  # cuDNN flash attention on GPU where shapes and dtypes allow, else XLA
  return c


def _demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Small CoCa on the embedded scenes at 32 px: 16 image tokens, so 16 captioner queries, not 256."""
  demo_data(c)
  c.data.add_bos = True
  c.model = dict(
    image=dict(width=128, depth=4, mlp_dim=512, num_heads=4, patch_size=8),
    text=dict(vocab_size=1000, width=128, mlp_dim=512, num_heads=4, unimodal_depth=2, multimodal_depth=2, max_len=16),
    embed_dim=128,
    num_cap_queries=16,
    num_con_queries=1,
    temperature_init=CLIP_TEMPERATURE_INIT,
    bias_init=None,
    max_scale=100.0,
  )
  # ~1.2 steps/s on the 2-core CPU (the decoder and the 1000-way caption head cost ~2.5 SigLIP-demo
  # steps); 600 steps fit the 15-minute budget with the evaluations.
  demo_trainer(c, steps=600)
  c.schedule.warmup_steps = 50
  c.lr_mults = (("t", 10.0),)  # as the CLIP demo: 600 steps, not 500k
  c.eval_at_start = True  # the untrained model's CIDEr and zero-shot, logged as step 0
  c.evals.zeroshot.every = 300
  c.evals.retrieval.every = 300
  c.evals.captioning = caption_evals(every=300, max_examples=placeholder(int))
  c.evals.probe = dict(type="probe", every=0, train_examples=2048, steps=300)  # frozen-feature protocol, at the end
  return c


def _video_demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Direction of motion (left/right/up/down) of 4-frame clips, trained from scratch.

  The object moves 0.12 of the image over the clip (2 px at 16 px), so the encoder uses 4-px
  patches and fixed sin-cos positions (with 8-px patches, or width 32 / depth 1, the classifier
  stayed at chance); a constant lr of 2e-3 gets it past the initial plateau at chance.
  """
  demo_data(c)
  c.data.builder.update(num_frames=4, num_train=4000, image_size=16)
  c.data.with_frames = True
  c.data.pp_train = "decode|value_range(-1, 1)"  # as measured; flip_lr would be safe (it swaps the left/right labels)
  c.data.pp_eval = "decode|value_range(-1, 1)"
  c.model_name = "video_classifier"
  c.objective_name = "classification"
  c.objective = ml_collections.ConfigDict(dict(input_key="frames", label_key="motion"))
  c.model = dict(
    image=dict(width=64, depth=3, mlp_dim=128, num_heads=2, patch_size=4, posemb="sincos2d"),
    num_classes=4,
    num_frames=4,
    num_heads=2,
  )
  demo_trainer(c, steps=600)
  c.batch_size = 64
  c.lr = 2e-3
  c.optimizer_kw.b2 = 0.95
  c.schedule = ml_collections.ConfigDict(dict(name="constant", warmup_steps=10))
  c.evals = ml_collections.ConfigDict(
    dict(
      motion=dict(type="classify", every=300, split="test", input_key="frames", label_key="motion"),
    )
  )
  return c
