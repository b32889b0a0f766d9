r"""LLaVA stage 2 (visual instruction tuning: connector + LM learn). See configs/llava_base.py.

python -m vlm.train --config=configs/llava_stage2.py:demo --workdir=/tmp/llava_demo/stage2
"""

import ml_collections

from configs import llava_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return llava_base.stage_config("instruct", arg)
