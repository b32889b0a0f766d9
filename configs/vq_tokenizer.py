r"""Discrete image tokenizer, ViT-VQGAN style (Yu et al. 2022, "Vector-quantized Image Modeling with
Improved VQGAN"), trained with the VQ-VAE loss (MSE + codebook + 0.25 commitment).

The codes are the targets of BEiT/FLAVA-style masked image modelling and the image tokens of
early-fusion (Chameleon-style) models: one code per patch, so a ViT of the same patch size sees
the same grid.

Accelerator recipe: 256 px, 16 px patches (16 x 16 = 256 codes per image, the grid of a ViT-B/16
at 256 px; the paper uses 8 px patches, 32 x 32 codes), codebook 8192 of 32-d l2-normalised codes
(sec. 3.2, sec. 4.1), encoder and decoder each the paper's "Small" transformer (Table 1: 8 layers,
width 512, MLP 2048, 8 heads); Adam with beta2 0.99, lr 1e-4 warmed up over 5k steps then cosine,
weight decay 1e-4, batch 256, 500k steps (sec. 4.1). The paper's perceptual, adversarial and
logit-Laplace terms are not included: this is the l2 + VQ part of its loss. Point `data.source`
at your images:

  python -m vlm.train --config=configs/vq_tokenizer.py --workdir=/tmp/vq --config.data.source=tfds:NAME

`:demo` trains a small tokenizer on the embedded scenes at 32 px (8 px patches: 4 x 4 codes from
a 512-entry codebook) on a 2-core CPU in about a minute and a half, evaluating reconstruction PSNR
and codebook use on the test split before and after training:

  python -m vlm.train --config=configs/vq_tokenizer.py:demo --workdir=/tmp/vq_demo

`:demo_long` trains the same tokenizer 1500 steps (about 6 minutes) for sharper reconstructions;
the early-fusion demo (configs/chameleon.py) generates images with its codes. `:demo_1d` is
`:demo_long` as a 1-D tokenizer (TiTok, Yu et al. 2024): 16 codes read from 16 learned latent
tokens instead of one per patch (model.latent_tokens), the same count as the 4 x 4 grid.

Use the trained codes elsewhere with `model.apply({'params': p}, images, method=VQTokenizer.encode)`;
a model that holds the tokenizer as a submodule named 'tokenizer' loads it with
`--config.init.path=/tmp/vq_demo --config.init.mapping="{'tokenizer/': ''}"`.
"""

import ml_collections

from configs.common import base_config, demo_data, demo_trainer


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.model_name = "vq_tokenizer"
  c.objective_name = "vq"
  # VQ-VAE eq. 3. entropy_weight > 0 adds the MaskGIT / MAGVIT-v2 codebook-usage term (vlm.objectives.vq).
  c.objective = ml_collections.ConfigDict(
    dict(codebook_weight=1.0, commitment=0.25, entropy_weight=0.0, entropy_temperature=0.01)
  )
  if arg == "demo":
    return _demo(c)
  if arg == "demo_long":
    # 5x longer (5.5 min): at 300 steps the reconstructions are flat blobs per patch (PSNR 20.9) and the
    # Llip demo recognises the colour and shape of 13% of them; at 1500, PSNR 26.2 and 46% (85% on the
    # real images). The early-fusion demo (configs/chameleon.py) draws its images with these codes.
    c = _demo(c)
    c.total_steps = c.checkpoint_every = 1500
    return c
  if arg == "demo_1d":
    # Same 16 codes per image, not tied to patches. Measured (test, 1500 steps, 7 min 55 s): PSNR 24.6
    # vs 26.2 for the grid, and the Llip demo recognises 33% of the reconstructions vs 46%: with the
    # l2 loss alone the 1-D codes blur more (TiTok trains its 1-D tokenizer on proxy codes, sec. 3.3).
    c = get_config("demo_long")
    c.model.update(latent_tokens=16, image_size=32)
    return c
  if arg not in (None, ""):
    raise ValueError(f"configs/vq_tokenizer.py: unknown variant {arg!r}; known: demo, demo_long, demo_1d")
  c.model = dict(width=512, depth=8, mlp_dim=2048, num_heads=8, patch_size=16, codebook_size=8192, code_dim=32)
  c.batch_size = 256
  c.total_steps = 500_000
  c.optimizer = "adamw"
  c.optimizer_kw = ml_collections.ConfigDict(dict(b1=0.9, b2=0.99, eps=1e-8))
  c.lr = 1e-4
  c.wd = 1e-4
  c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=5_000))
  c.data.pp_train = "decode|random_resized_crop(256, scale=(0.8, 1))|flip_lr|value_range(-1, 1)"
  c.data.pp_eval = "decode|resize(256)|value_range(-1, 1)"
  c.log_every = 100
  c.checkpoint_every = 5_000
  c.evals = ml_collections.ConfigDict(
    dict(
      reconstruction=dict(type="reconstruction", every=10_000, split="validation", max_examples=10_000),
    )
  )
  c.model.dtype = "bfloat16"  # activations and matmuls; params, optimiser state, loss, norms stay float32
  c.attention_impl = "auto"  # cuDNN flash attention on GPU where shapes and dtypes allow, else XLA
  return c


def _demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A small tokenizer on the embedded scenes at 32 px: 8 px patches, 4 x 4 codes, 512 codes."""
  demo_data(c)
  c.data.pp_train = "decode|resize(32)|flip_lr|value_range(-1, 1)"  # no captions involved: flips are safe
  c.model = dict(width=128, depth=2, mlp_dim=256, num_heads=4, patch_size=8, codebook_size=512, code_dim=32)
  # Without a usage term the demo's codes collapse (1 code in use at step 50, 4% of the codebook after
  # 400 steps: test PSNR 20.9); with entropy_weight 0.02, 98% in use and PSNR 21.5.
  c.objective.entropy_weight = 0.02
  demo_trainer(c, steps=300)
  c.lr = 2e-3
  c.optimizer_kw.b2 = 0.99
  c.schedule.warmup_steps = 40
  c.checkpoint_every = 300
  c.eval_at_start = True  # the untrained model's PSNR and usage, logged as step 0
  c.evals = ml_collections.ConfigDict(
    dict(
      reconstruction=dict(
        type="reconstruction", every=0, split="test", max_examples=ml_collections.config_dict.placeholder(int)
      ),
    )
  )
  return c
