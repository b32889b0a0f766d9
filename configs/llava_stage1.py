r"""LLaVA stage 1 (feature alignment: only the connector learns). See configs/llava_base.py.

python -m vlm.train --config=configs/llava_stage1.py:demo --workdir=/tmp/llava_demo/stage1
"""

import ml_collections

from configs import llava_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return llava_base.stage_config("align", arg)
