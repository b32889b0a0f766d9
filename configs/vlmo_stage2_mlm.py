r"""VLMo stage 2 (sec. 2.3): text-only masked language modelling from the stage-1 checkpoint.

The L-FFN experts and the text embeddings learn; the shared self-attention and the V-FFN experts
(and the image-side parameters, which text-only data cannot train) stay frozen
(configs/vlmo_base.py STAGE2_FROZEN).

  python -m vlm.train --config=configs/vlmo_stage2_mlm.py:demo --workdir=/tmp/vlmo_demo/stage2

Then configs/vlmo_base.py (image-text). See configs/vlmo_base.py for the whole pipeline.
"""

import ml_collections

from configs import vlmo_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return vlmo_base.stage_config("mlm", arg, f"{vlmo_base.DEMO_ROOT}/stage1" if arg == "demo" else None)
