r"""Frozen (Tsimpoukelli et al. 2021, "Multimodal Few-Shot Learning with Frozen Language Models"):
the language model is frozen; a vision encoder and a linear map are trained on captioning so that
the pooled image feature becomes a visual prefix of n = 2 LM embeddings (sec. 3.1: NF-ResNet-50,
global pooling, linear map to n * D, n = 2).

  python -m vlm.train --config=configs/lm_pretrain.py:demo --workdir=/tmp/vlm_lm_demo
  python -m vlm.train --config=configs/frozen.py:demo --workdir=/tmp/frozen_demo

The demo's vision encoder is a small ViT (global average pooling) started from the CLIP demo's
image tower (/tmp/clip_demo, configs/clip_b16.py:demo; leave init.vision.path empty to train it
from scratch as the paper does). Frozen is trained on captions only; `vqa/accuracy` measures its
zero-shot transfer to questions in the chat template.
"""

import ml_collections

from configs import llava_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "demo"):
    raise ValueError(f"configs/frozen.py: unknown variant {arg!r}; known: demo")
  demo = arg == "demo"
  c = llava_base.stage_config("align", arg)
  c.model.update(pool="gap", feature_layer=None, connector_type="linear", prefix_tokens=2)
  c.frozen = (r"lm/.*",)  # the vision encoder and the linear map learn
  c.data.conversation.update(
    tasks=("caption",),
    image_tokens=2,
    prompt_length=c.data.conversation.prompt_length - c.data.conversation.image_tokens + 2,
    length=48 if demo else 128,
  )
  if demo:
    c.total_steps = 600
    c.lr = 1e-3
  else:  # Conceptual Captions, batch 128, Adam lr 3e-4 (sec. 4.1 of the paper)
    c.batch_size = 128
    c.lr = 3e-4
    c.total_steps = 100_000
  c.checkpoint_every = c.total_steps
  return c
