r"""Flamingo (Alayrac et al. 2022): a frozen vision encoder -> Perceiver resampler (64 latents, 6
layers; keys/values from [media; latents]) -> a frozen LM with gated cross-attention blocks
(tanh gates at 0) before its layers; each text token attends to the image just before it
(vlm.models.flamingo, vlm.nn.perceiver). Only the resampler and the gated blocks learn (sec. 2).

Data: interleaved image-text documents (data.interleaved_images = M; vlm.data.conversation.interleave):
`<image>caption of image 1.<|endofchunk|><image>question about image k?` -> answer, each text chunk
closed by the end-of-chunk marker (sec. 2.3's <EOC>; data.conversation.end_of_chunk, one special id).
A question about the second image is answered through the cross-attention to it; one about the first
image must be answered from the document's text (that image is out of the question's view).

`:demo` (embedded scenes, two images per document, the CLIP demo's tower and the LM demo, both
frozen) reports `vqa/accuracy`: exact match of greedy answers to "... in the first / second image?":

  python -m vlm.train --config=configs/clip_b16.py:demo --workdir=/tmp/clip_demo
  python -m vlm.train --config=configs/lm_pretrain.py:demo --workdir=/tmp/vlm_lm_demo
  python -m vlm.train --config=configs/flamingo.py:demo --workdir=/tmp/flamingo_demo

Demo result (2026-11-24, 800 steps, 23 min 23 s on 2 shared cores): 82.7% exact match (held-out
combinations 75.7%); second-image questions 84%, first-image 83% (600 questions).

`:demo_docs` trains the same model on stored interleaved documents (2-4 images between paragraphs,
`data.builder.documents = 4`, `data.max_images = 4`; README "Interleaved documents"):

  python -m vlm.train --config=configs/flamingo.py:demo_docs --workdir=/tmp/flamingo_docs

Result (2026-11-25, 800 steps): 68.6% exact match on the test documents' questions (held-out
combinations 60.1%).

At scale (no `:demo`): an NFNet-F6 / ViT encoder and a Chinchilla-style LM are not downloadable
here; import an IDEFICS checkpoint (vlm.convert.import_hf on its directory) into `init.path`.
"""

import ml_collections

from configs.common import base_config, demo_data
from configs.lm_pretrain import conversation, demo_lm
from configs.llava_base import demo_init, demo_vision, vqa_eval


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "demo", "demo_docs"):
    raise ValueError(f"configs/flamingo.py: unknown variant {arg!r}; known: demo, demo_docs")
  if arg == "demo_docs":
    return demo_docs()
  demo = arg == "demo"
  c = base_config()
  c.model_name = "flamingo"
  c.objective_name = "lm"
  c.objective = ml_collections.ConfigDict(dict(image_key="image"))
  if demo:
    lm = demo_lm()
    c.model = dict(
      lm_config=lm,
      vision_config=demo_vision(),
      resampler_config=dict(num_latents=8, depth=2, num_heads=4, head_dim=32),
      xattn_config=dict(num_heads=4, head_dim=32),
      cross_attention_every=1,
      image_token_id=1000,
    )
  else:
    # Flamingo-3B-like sizes (Table 10 of the appendix: 64 latents, 6 resampler layers, a gated block
    # before every LM layer); the encoder here is a ViT-L/14 as in IDEFICS / OpenFlamingo.
    lm = dict(
      vocab_size=32_064,
      width=2560,
      depth=24,
      num_heads=20,
      mlp_dim=10_240,
      mlp_act="swiglu",
      rope_theta=10_000.0,
      norm_eps=1e-5,
      tie_embeddings=False,
    )
    c.model = dict(
      lm_config=lm,
      vision_config=dict(variant="L/14", class_token=True, pre_norm=True),
      resampler_config=dict(num_latents=64, depth=6),
      xattn_config=dict(),
      cross_attention_every=1,
      image_token_id=32_000,
    )
  c.frozen = (r"vision/.*", r"lm/.*")  # sec. 2: vision encoder and LM frozen
  c.wd = 0.0
  if demo:
    demo_data(c)
    c.data.caption_key = "caption"
    c.data.extra_text_keys = ("question", "answer")
    c.data.interleaved_images = 2
    c.data.conversation = conversation(("qa",), image_tokens=1, length=80)
    c.data.conversation.prompt_length = 48
    c.data.conversation.specials["<|endofchunk|>"] = 1005
    c.data.conversation.end_of_chunk = "<|endofchunk|>"
    c.init = demo_init()
    c.batch_size = 64
    c.total_steps = 800
    c.lr = 1e-3
    c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=30))
    c.log_every = 25
    c.evals = vqa_eval(every=0)
  else:
    # IdeficsImageProcessor (the imported IDEFICS checkpoints): 224 x 224 bicubic, OpenAI CLIP mean/std.
    c.data.pp_train = c.data.pp_eval = "decode|resize(224, method='bicubic')|rescale|normalize('clip')"
    c.data.extra_text_keys = ("question", "answer")
    c.data.interleaved_images = 2
    c.data.conversation = conversation(("qa",), image_tokens=1, length=512)
    c.data.conversation.specials = ml_collections.ConfigDict(
      {"<image>": 32_000, "<|endofchunk|>": 32_001, "<|end|>": 2}
    )
    c.data.conversation.end_of_chunk = "<|endofchunk|>"
    c.init = ml_collections.ConfigDict(dict(path=None, mapping=None, step=None))
    c.batch_size = 256
    c.total_steps = 100_000
    c.lr = 1e-4
    c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=5000))
    c.evals = vqa_eval(every=5000, max_examples=None)
  if not demo:
    c.model.dtype = "bfloat16"  # activations and matmuls; params, optimiser state, loss, norms stay float32
    c.attention_impl = "auto"  # cuDNN flash attention on GPU where shapes and dtypes allow, else XLA
  c.checkpoint_every = c.total_steps
  return c


def demo_docs() -> ml_collections.ConfigDict:
  """The demo on stored interleaved documents (the embedded scenes built with builder.documents = 4:
  an opening line, then 2-4 images each followed by a paragraph, OBELICS' layout): half document
  modelling (task 'document', loss on the text), half questions about the k-th image after the
  whole document (task 'qa'); no flips (a document's paragraphs are not mirrored with its images)."""
  c = get_config("demo")
  c.data.builder.documents = 4
  c.data.interleaved_images = 1
  c.data.max_images = 4
  c.data.pp_train = c.data.pp_eval = "decode|resize(32)|value_range(-1, 1)"
  c.data.conversation.tasks = ("document", "qa")
  c.data.conversation.task_weights = (1.0, 1.0)
  c.data.conversation.length = 144  # a document and its first question: up to ~115 tokens
  c.data.conversation.prompt_length = 128
  return c
