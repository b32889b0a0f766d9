"""Import/export of public checkpoints (Hugging Face safetensors)."""

from vlm.convert.flava import import_hf_flava
from vlm.convert.hf import export_hf, import_hf, model_kwargs_from_hf, stack_encoder_blocks, unstack_encoder_blocks

__all__ = ["export_hf", "import_hf", "import_hf_flava", "model_kwargs_from_hf", "stack_encoder_blocks",
           "unstack_encoder_blocks"]
