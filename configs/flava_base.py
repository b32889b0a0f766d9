r"""FLAVA (Singh et al. 2022, "FLAVA: A Foundational Language And Vision Alignment Model").

Default: the FLAVA-full recipe on image-text pairs. Architecture (sec. 3.1): ViT-B/16 image
encoder at 224 px (class token [CLS_I]), a text encoder of the same ViT-B size (12 layers, 768
wide, MLP 3072, 12 heads: BERT-base-sized; BERT's vocabulary size, 30,522 pieces, as a
SentencePiece model with this repository's special ids pad 0, eos 1, bos 3, plus a [MASK] row),
a 6-layer 768-wide multimodal encoder over [cls_M; image states; text states], 768-d contrastive
projections. Losses (sec. 3.3), every weight 1: global contrastive (CLIP's softmax loss,
temperature init 0.07, across all devices), MLM (15% of the tokens), MIM and MMM on about 40% of
the patches with BEiT's blockwise masking, predicting the codes of a frozen image tokenizer
(FLAVA uses DALL-E's dVAE, 8192 codes, one per 16-px patch: a 14 x 14 grid at 224 px; here
vlm.models.vq.VQTokenizer from configs/vq_tokenizer.py), and ITM. Optimiser as in the public
torchmultimodal FLAVA example: AdamW (b1 0.9, b2 0.999, eps 1e-8), lr 2e-4, weight decay 0.01,
2,000 warmup steps then cosine, 450k steps. The global batch (8,192 pairs) is our choice: size it
to your accelerators. Train the tokenizer first, at the same resolution and patch size, then
FLAVA from it:

  python -m vlm.train --config=configs/vq_tokenizer.py --workdir=/tmp/vq224 \
      --config.data.source=tfds:NAME --config.data.pp_train="decode|resize(224)|value_range(-1, 1)" \
      --config.data.pp_eval="decode|resize(224)|value_range(-1, 1)"
  python -m vlm.train --config=configs/flava_base.py --workdir=/tmp/flava \
      --config.init.path=/tmp/vq224 --config.data.source=tfds:NAME --config.data.tokenizer=/path/spm30k.model

(Without init.path the tokenizer keeps its random initialisation: valid but uninformative targets.)

`:demo` trains a small FLAVA on the embedded scenes at 32 px (8-px patches: a 4 x 4 grid, the
grid of the demo tokenizer) on a 2-core CPU with about the compute of the CLIP demo's 1,500 steps
(13.5 minutes measured with other jobs sharing the cores; not timed on an idle machine), reaching
96% zero-shot top-1 on the seen combinations (zero-shot and retrieval on the test split). Its tokenizer comes from
the VQ demo (two to three minutes):

  python -m vlm.train --config=configs/vq_tokenizer.py:demo --workdir=/tmp/vq_demo
  python -m vlm.train --config=configs/flava_base.py:demo --workdir=/tmp/flava_demo

Another tokenizer workdir: `:demo,tokenizer=DIR` or `--config.init.path=DIR`. The tokenizer's
parameters load under 'tokenizer/' (`init.mapping={'tokenizer/': ''}`) and stay frozen
(`frozen=['tokenizer/.*']`).
"""

import ml_collections

from configs import vq_tokenizer
from configs.common import base_config, demo_data, demo_trainer
from configs.defaults import CLIP_TEMPERATURE_INIT

DEMO_TOKENIZER_DIR = "/tmp/vq_demo"


def tokenizer_hint(config_arg: str) -> str:
  return (
    f"FLAVA's MIM targets come from a trained image tokenizer: run "
    f"`python -m vlm.train --config=configs/vq_tokenizer.py{config_arg} --workdir=DIR` first and "
    f"point --config.init.path at DIR"
  )


def _parse(arg: str | None) -> tuple[str, dict[str, str]]:
  """'demo,tokenizer=/x' -> ('demo', {'tokenizer': '/x'})."""
  parts = (arg or "").split(",")
  opts = {}
  for p in parts[1:]:
    key, sep, value = p.partition("=")
    if not sep or key not in ("tokenizer",):
      raise ValueError(f"configs/flava_base.py: unknown option {p!r}; known: tokenizer=DIR")
    opts[key] = value
  return parts[0], opts


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, opts = _parse(arg)
  c = base_config()
  c.model_name = "flava"
  c.objective_name = "flava"
  # Sec. 3.3: every loss weight 1; MLM 15% (BERT), MIM ~40% blockwise (BEiT). FLAVA draws ITM
  # negatives at random (itm_hard_negatives=False); VLMo-style hard negatives are one flag away.
  c.objective = ml_collections.ConfigDict(
    dict(
      contrastive_weight=1.0,
      mlm_weight=1.0,
      mim_weight=1.0,
      mmm_text_weight=1.0,
      mmm_image_weight=1.0,
      itm_weight=1.0,
      mask_id=30_522,
      mlm_rate=0.15,
      mim_ratio=0.4,
      mim_masking="blockwise",
      itm_hard_negatives=False,
      special_ids=(0, 1, 3),
      impl="all_gather",
    )
  )
  c.init.mapping = {"tokenizer/": ""}
  c.frozen = ("tokenizer/.*",)
  c.data.add_bos = True  # BOS is the text encoder's [CLS_T]
  if variant == "demo":
    return _demo(c, opts)
  if variant not in ("",):
    raise ValueError(f"configs/flava_base.py: unknown variant {variant!r}; known: demo")
  c.init.path = opts.get("tokenizer")  # required: a VQ workdir at 224 px with 16-px patches
  c.init.hint = tokenizer_hint("")
  c.model = dict(
    image=dict(variant="B/16", norm_eps=1e-12),
    # 30,522 pieces + [MASK]; BERT's LayerNorm on the embeddings, as FLAVA's text encoder.
    text=dict(variant="B", vocab_size=30_523, max_len=512, norm_eps=1e-12, embed_norm=True),
    multimodal=dict(variant="B", depth=6, norm_eps=1e-12),
    tokenizer=dict(vq_tokenizer.get_config().model),  # 16-px patches, 8192 codes
    embed_dim=768,
    temperature_init=CLIP_TEMPERATURE_INIT,
    bias_init=None,
    max_scale=100.0,
    fuse_prenorm=True,  # the multimodal encoder reads the towers' states before their final norm (as HF)
  )
  c.batch_size = 8_192
  c.total_steps = 450_000
  c.optimizer_kw = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8))
  c.lr = 2e-4
  c.wd = 0.01
  c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=2_000))
  c.data.pp_train = "decode|random_resized_crop(224, scale=(0.9, 1))|value_range(-1, 1)"  # the tokenizer's range
  c.data.pp_eval = "decode|resize(224)|value_range(-1, 1)"
  c.data.text_length = 77
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


def _demo(c: ml_collections.ConfigDict, opts: dict[str, str]) -> ml_collections.ConfigDict:
  """Small FLAVA on the embedded scenes at 32 px; the tokenizer of configs/vq_tokenizer.py:demo."""
  demo_data(c)
  c.data.add_bos = True
  c.init.path = opts.get("tokenizer", DEMO_TOKENIZER_DIR)
  c.init.hint = tokenizer_hint(":demo")
  # The embedded tokenizer: pad 0, eos 1, unk 2, bos 3, 1000 pieces and no [MASK]: row 1000 is added.
  c.objective.mask_id = 1000
  w = dict(width=128, mlp_dim=512, num_heads=4)
  c.model = dict(
    image=dict(depth=4, patch_size=8, **w),
    text=dict(vocab_size=1001, depth=2, max_len=16, embed_norm=True, **w),
    multimodal=dict(depth=1, **w),  # FLAVA-base: half the text encoder's depth (6 of 12); here 1 of 2
    tokenizer=dict(vq_tokenizer.get_config("demo").model),  # 8-px patches, 512 codes
    embed_dim=128,
    temperature_init=CLIP_TEMPERATURE_INIT,
    bias_init=None,
    max_scale=100.0,
    fuse_prenorm=True,
  )
  # One step costs about 3.6 CLIP-demo steps (58 vs 16 GFLOP: two passes of each encoder, the
  # multimodal encoder over each pair and its two ITM negatives, the tokenizer, five heads), so
  # 450 steps take about the compute of the CLIP demo's 1,500.
  demo_trainer(c, steps=450)
  c.schedule.warmup_steps = 50
  c.lr_mults = (("t", 10.0),)  # as the CLIP demo: a few hundred steps, not 450k
  c.evals.zeroshot.every = 225
  c.evals.retrieval.every = 225
  return c
