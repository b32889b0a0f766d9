"""Import/export of public checkpoints (Hugging Face safetensors, big_vision npz).

`import_hf(path)` dispatches on config.json's model_type to the importer registered for it
(vlm.convert.registry.register_importer); the layout helpers the importers share are in vlm.convert.common.
"""

from vlm.convert.big_vision import import_big_vision
from vlm.convert.blip2 import import_hf_blip2, import_hf_blip2_qformer, import_hf_blip2_stage1, import_hf_blip2_vision
from vlm.convert.common import stack_encoder_blocks, unstack_encoder_blocks
from vlm.convert.flava import import_hf_flava
from vlm.convert.llava import import_hf_llava, model_kwargs_from_hf_llava
from vlm.convert.llm import import_hf_llm, model_kwargs_from_hf_llm
from vlm.convert.hf import export_hf, import_hf, model_kwargs_from_hf

__all__ = [
  "export_hf",
  "import_big_vision",
  "import_hf",
  "import_hf_blip2",
  "import_hf_blip2_qformer",
  "import_hf_blip2_stage1",
  "import_hf_blip2_vision",
  "import_hf_flava",
  "import_hf_llava",
  "import_hf_llm",
  "model_kwargs_from_hf",
  "model_kwargs_from_hf_llava",
  "model_kwargs_from_hf_llm",
  "stack_encoder_blocks",
  "unstack_encoder_blocks",
]
