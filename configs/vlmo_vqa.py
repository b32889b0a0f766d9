r"""VLMo fine-tuned for VQA as answer classification (sec. 3.2): the fusion encoder on [question; image],
the text [CLS] pooled, then Linear(2D) -> LN -> GELU -> Linear(answers), cross-entropy over
data.answer_vocab. Starts from the image-text (stage 3) checkpoint; the classifier is new.

  python -m vlm.train --config=configs/vlmo_vqa.py:demo --workdir=/tmp/vlmo_demo/vqa

Reports `vqa/top1` (answer accuracy) on the embedded test split. See configs/vlmo_base.py.
"""

import ml_collections

from configs import vlmo_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return vlmo_base.stage_config("vqa", arg, f"{vlmo_base.DEMO_ROOT}/stage3" if arg == "demo" else None)
