r"""BLIP-2 stage 1 (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen
Image Encoders and Large Language Models", sec. 3.2 and 3.4): vision-language representation
learning of the Q-Former against a frozen image encoder with ITC (max over queries) + ITM (global
hard negatives) + ITG, weights 1 / 1 / 1 (vlm.models.blip2, vlm.objectives.blip2).

Recipe (sec. 3.4): frozen EVA-CLIP ViT-g/14 without its last layer (features after a LayerNorm),
32 queries of width 768, Q-Former initialised from BERT-base (cross-attention layers random),
ITC embeddings of 256; 250k steps at batch 1680 (ViT-g), AdamW (b1 0.9, b2 0.98, weight decay
0.05), peak lr 1e-4 after a 2k-step linear warmup, cosine decay; 224 px images with random resized
crops and horizontal flips; 32 text tokens. The ViT is frozen: `frozen` gives it no update and no
optimiser state, and model.freeze_image runs it in inference mode without a backward pass. Point
init.path at a checkpoint of ours holding the ViT ('img/...') and the BERT-initialised Q-Former
('qformer/...'), e.g. converted with vlm.convert.blip2 (import_hf_blip2_vision, or
import_hf_blip2_stage1 for a whole HF Blip2ForImageTextRetrieval):

  python -m vlm.train --config=configs/blip2_stage1.py --workdir=/tmp/blip2/stage1 \
      --config.init.path=/path/to/eva_vit_g_and_bert --config.data.source=tfds:NAME \
      --config.data.tokenizer=/path/bert_wordpiece_as_spm.model

`:demo` runs on the embedded scenes at 32 px on a 2-core CPU. There is no pretrained image encoder
for these images, so the demo's small ViT (width 96, 4 layers) is NOT frozen: it is trained from
scratch jointly with a 4-layer, 96-wide Q-Former with 8 queries (model.freeze_image=False, no
`frozen`). Retrieval scores the image by its best query (vlm.evals.contrastive.similarity):

  python -m vlm.train --config=configs/blip2_stage1.py:demo --workdir=/tmp/blip2_demo
"""

import ml_collections

from configs.common import base_config, demo_data, demo_trainer
from configs.defaults import BERT_BASE_QFORMER, BLIP2_TEMPERATURE_INIT, EVA_VIT_G

TOKENIZER_VOCAB = 1000  # the embedded dataset's SentencePiece vocabulary; [DEC] = 1000 is one more row


def demo_model() -> dict:
  """A 96-wide ViT/8 at 32 px (4 layers) and a 96-wide, 4-layer Q-Former with 8 queries."""
  return dict(
    image=dict(
      width=96, depth=4, mlp_dim=384, num_heads=4, patch_size=8, class_token=True, pool_type="none", posemb="learn"
    ),
    qformer=dict(
      width=96,
      depth=4,
      num_heads=4,
      mlp_dim=384,
      cross_attention_frequency=2,
      vocab_size=TOKENIZER_VOCAB + 1,
      max_len=16,
      norm_eps=1e-12,
      dropout=0.0,
    ),
    num_query_tokens=8,
    embed_dim=64,
    freeze_image=False,
    dec_id=TOKENIZER_VOCAB,
    temperature_init=BLIP2_TEMPERATURE_INIT,
    max_scale=100.0,
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.model_name = "blip2_qformer"
  c.objective_name = "blip2_stage1"
  c.objective = ml_collections.ConfigDict(
    dict(
      itc_weight=1.0,
      itm_weight=1.0,
      itg_weight=1.0,
      itc_label_smoothing=0.1,
      itg_label_smoothing=0.1,
      itm_hard_negatives=True,
      pad_id=0,
    )
  )
  c.data.add_bos = True  # BOS is the [CLS] of ITC / ITM; ITG replaces it by [DEC]
  if arg == "demo":
    demo_data(c)
    # Canonical captions (as the VLMo demo): with the varied phrasings, the hardest ITM negatives
    # are paraphrases that also fit the image.
    c.data.caption_key = "caption"
    c.model = demo_model()
    demo_trainer(c, steps=400)
    c.batch_size = 64
    c.schedule.warmup_steps = 50
    c.lr_mults = (("t", 10.0),)  # as the CLIP demo: the temperature must move far in few steps
    c.evals.zeroshot.every = c.evals.retrieval.every = 200
    c.checkpoint_every = 200
    return c
  if arg not in (None, ""):
    raise ValueError(f"configs/blip2_stage1.py: unknown variant {arg!r}; known: demo")
  c.model = dict(
    image=dict(EVA_VIT_G),
    qformer=dict(BERT_BASE_QFORMER),
    num_query_tokens=32,
    embed_dim=256,
    freeze_image=True,
    dec_id=30522,
    temperature_init=BLIP2_TEMPERATURE_INIT,
    max_scale=1000.0,
  )
  c.frozen = (r"img/.*",)
  c.init = ml_collections.ConfigDict(dict(path=ml_collections.config_dict.placeholder(str), mapping=None, step=None))
  c.batch_size = 1680
  c.total_steps = 250_000
  c.optimizer_kw = ml_collections.ConfigDict(dict(b1=0.9, b2=0.98, eps=1e-8))
  c.lr = 1e-4
  c.wd = 0.05
  c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=2000))
  # LAVIS's blip_image_train (RandomResizedCrop(224, scale=(0.5, 1), BICUBIC), horizontal flip); eval =
  # BlipImageProcessor of Blip2Processor (224 x 224 bicubic, OpenAI CLIP mean/std).
  c.data.pp_train = "decode|random_resized_crop(224, scale=(0.5, 1), method='bicubic')|flip_lr|normalize('clip')"
  c.data.pp_eval = "decode|resize(224, method='bicubic')|rescale|normalize('clip')"
  c.data.text_length = 32
  c.log_every = 100
  c.evals = ml_collections.ConfigDict(
    dict(
      zeroshot=dict(type="zeroshot", every=10_000, split="test"),
      retrieval=dict(type="retrieval", every=10_000, split="test"),
    )
  )
  c.model.dtype = "bfloat16"  # activations and matmuls; params, optimiser state, loss, norms stay float32
  c.attention_impl = "auto"  # cuDNN flash attention on GPU where shapes and dtypes allow, else XLA
  return c
