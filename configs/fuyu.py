r"""Fuyu (Adept 2023, "Fuyu-8B: A Multimodal Architecture for AI Agents"): no image encoder. Image
patches are linearly projected straight into the decoder (vlm.models.fuyu.FuyuPatchEmbed inside
vlm.models.vision_lm with vision_model='fuyu_patches'); the sequence holds each patch row's
placeholders followed by a `|NEWLINE|` row-break token (data.conversation.image_row_break /
image_rows), so any resolution works without a fixed-size encoder. The decoder is Persimmon-8B
(LayerNorm, query/key LayerNorm, half rotary, squared-ReLU MLP: DecoderLM's norm_type, qk_norm,
rotary_fraction, mlp_act='relu2'); everything learns. An HF FuyuForCausalLM directory imports with
vlm.convert.import_hf (tests/test_fuyu.py checks logits and greedy tokens against transformers).

At scale (no `:demo`): Fuyu-8B's sizes (30 px patches; images scaled to [-1, 1]); Adept published
no training recipe, so the optimiser settings here are this codebase's choice for fine-tuning an
imported Fuyu-8B, not the paper's.

`:demo` (the embedded scenes at 32 px, 8 px patches: 4 rows of 4 patches, each row + `|NEWLINE|`)
starts the decoder from configs/lm_pretrain.py's LM (a Llama-style DecoderLM, not Persimmon: the
architecture point is the encoder-free input) and the patch projection from scratch:

  python -m vlm.train --config=configs/lm_pretrain.py:demo --workdir=/tmp/vlm_lm_demo
  python -m vlm.train --config=configs/fuyu.py:demo --workdir=/tmp/fuyu_demo
  python -m vlm.predict --workdir=/tmp/fuyu_demo --image=PATH --prompt="what colour is the large star?"

Demo result (2026-11-24, 1200 steps, 12 min 55 s on 2 idle cores): 90.8% VQA exact match on the test
split (held-out combinations 78.0%).
"""

import ml_collections

from configs.common import base_config, demo_data
from configs.lm_pretrain import conversation, demo_lm
from configs.llava_base import demo_init, vqa_eval

DEMO_PATCH, DEMO_SIZE = 8, 32


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "demo"):
    raise ValueError(f"configs/fuyu.py: unknown variant {arg!r}; known: demo")
  demo = arg == "demo"
  c = base_config()
  c.model_name = "vision_lm"
  c.objective_name = "lm"
  c.objective = ml_collections.ConfigDict(dict(image_key="image"))
  if demo:
    lm, patch, size, newline = demo_lm(), DEMO_PATCH, DEMO_SIZE, 1006
  else:
    # Persimmon-8B (Fuyu-8B's decoder): 36 layers of width 4096, 64 heads, relu^2 MLP of 16384.
    lm = dict(
      vocab_size=262_144,
      width=4096,
      depth=36,
      num_heads=64,
      mlp_dim=16_384,
      mlp_act="relu2",
      qkv_bias=True,
      out_bias=True,
      mlp_bias=True,
      rope_theta=25_000.0,
      norm_eps=1e-5,
      norm_type="layer",
      qk_norm="layer",
      rotary_fraction=0.5,
      tie_embeddings=False,
      scan_layers=True,
      remat_policy="dots",
    )  # one compiled block for the 36 (vlm.models.decoder)
    patch, size, newline = 30, 1080, 71_019
  rows = size // patch
  c.model = dict(
    lm_config=lm,
    vision_model="fuyu_patches",
    vision_method="patch_features",
    connector_type="none",
    vision_config=dict(patch_size=patch, width=lm["width"]),
    image_token_id=1000 if demo else 71_011,
  )
  c.frozen = ()  # Fuyu trains the patch projection and the decoder together
  c.data.extra_text_keys = ("caption_detailed", "question", "answer")
  if demo:
    demo_data(c)
    c.data.caption_key = "caption"
    c.data.conversation = conversation(("qa", "detailed"), image_tokens=rows * rows, length=96, task_weights=(3.0, 1.0))
    c.data.conversation.prompt_length = rows * (rows + 1) + 24
    c.init = ml_collections.ConfigDict(dict(lm=demo_init().lm))  # the LM demo; no image encoder to load
    c.batch_size = 64
    c.total_steps = 1200
    c.lr = 1e-3
    c.wd = 0.0
    c.grad_clip_norm = 1.0
    c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=50))
    c.log_every = 25
    c.evals = vqa_eval(every=0)
  else:
    c.data.pp_train = c.data.pp_eval = f"decode|resize({size})|value_range(-1, 1)"
    c.data.conversation = conversation(("qa", "detailed"), image_tokens=rows * rows, length=rows * (rows + 1) + 512)
    # Fuyu-8B's ids: image placeholder 71011, |NEWLINE| 71019 (FuyuProcessor), EOS 2 (FuyuConfig's default);
    # a plain question / answer template (Fuyu's own prompts end the question with "\n").
    c.data.conversation.specials = ml_collections.ConfigDict({"<image>": 71_011, "|NEWLINE|": newline, "<|end|>": 2})
    c.data.conversation.template = ml_collections.ConfigDict(
      dict(system="{content} ", user="{content}\n", assistant="{content}<|end|>", generation_prefix="")
    )
    c.init = ml_collections.ConfigDict(dict(path=None, mapping=None, step=None))  # an imported Fuyu-8B
    c.batch_size = 256
    c.total_steps = 10_000
    c.lr = 1e-5
    c.wd = 0.1
    c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=200))
    c.evals = vqa_eval(every=2000, max_examples=None)
  if demo:
    c.data.conversation.specials["|NEWLINE|"] = newline
  c.data.conversation.image_row_break = "|NEWLINE|"
  c.data.conversation.image_rows = rows
  if not demo:
    c.model.dtype = "bfloat16"  # activations and matmuls; params, optimiser state, loss, norms stay float32
    c.attention_impl = "auto"  # cuDNN flash attention on GPU where shapes and dtypes allow, else XLA
  c.checkpoint_every = c.total_steps
  return c
