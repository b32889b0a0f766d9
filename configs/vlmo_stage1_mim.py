r"""VLMo stage 1 (sec. 2.3): image-only masked image modelling, BEiT-style (Bao et al. 2022, sec. 2.2).

About 40% of the patches (blockwise) become the mask token; the image-only MoME encoder (V-FFN and
the shared attention) predicts the codes a frozen discrete tokenizer gives those patches. The
tokenizer is ours (configs/vq_tokenizer.py), loaded from init.path into the `tokenizer`
submodule and frozen; nothing else is initialised from it.

  python -m vlm.train --config=configs/vq_tokenizer.py:demo --workdir=/tmp/vq_demo
  python -m vlm.train --config=configs/vlmo_stage1_mim.py:demo --workdir=/tmp/vlmo_demo/stage1

Then configs/vlmo_stage2_mlm.py. See configs/vlmo_base.py for the whole pipeline.
"""

import ml_collections

from configs import vlmo_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return vlmo_base.stage_config("mim", arg, vlmo_base.VQ_DEMO_WORKDIR if arg == "demo" else None)
