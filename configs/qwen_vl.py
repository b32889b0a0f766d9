r"""Qwen-VL (Bai et al. 2023, sec. 2.1): ViT-bigG at 448 px -> the position-aware adapter, one
cross-attention layer with 256 learned queries and 2D sin-cos positions on queries and keys
(vlm.nn.resampler.QwenVLResampler) -> Qwen-7B reading the 256 tokens at its image placeholders.

In this codebase that is Monkey's visual side without windows (vlm.models.monkey.Monkey with
windows=False: one view, the image at the encoder's native size, no LoRA), so the two share one
implementation: configs/monkey.py builds both. Prompts as Monkey's ("{question} Answer:").

`:demo` trains on the embedded scenes (64 px resized to the 32 px view, 16 queries) from the CLIP
demo tower and the LM demo, on question/answer chats and detailed captions, reporting
`vqa/accuracy` on the test split:

  python -m vlm.train --config=configs/qwen_vl.py:demo --workdir=/tmp/qwen_vl_demo

Demo result (2026-11-24, 800 steps, 11 min 38 s on 2 shared cores): 86.0% exact match (held-out
colour-shape combinations 75.2%).
"""

import ml_collections

from configs import monkey


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "demo"):
    raise ValueError(f"configs/qwen_vl.py: unknown variant {arg!r}; known: demo")
  demo = arg == "demo"
  c = monkey.build(demo=demo, windows=False)
  if not demo:
    c.model.vision_config.window_size = 448  # the whole image at 448 px: one view, 256 tokens
    # Qwen-VL's visual.py transform: Resize((448, 448), BICUBIC) on PIL images, OpenAI CLIP mean/std.
    c.data.pp_train = c.data.pp_eval = "decode|resize(448, method='bicubic')|rescale|normalize('clip')"
  else:  # the ordinary scenes and every question type (Monkey's demo reads text only)
    c.data.builder.text_rich = 0
    c.data.question_regex = None
    c.data.conversation.max_turns = 3
  return c
