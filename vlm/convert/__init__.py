"""Import/export of public checkpoints (Hugging Face safetensors)."""

from vlm.convert.flava import import_hf_flava
from vlm.convert.llm import import_hf_llm, model_kwargs_from_hf_llm
from vlm.convert.hf import export_hf, import_hf, model_kwargs_from_hf, stack_encoder_blocks, unstack_encoder_blocks

__all__ = ["export_hf", "import_hf", "import_hf_flava", "import_hf_llm", "model_kwargs_from_hf",
           "model_kwargs_from_hf_llm", "stack_encoder_blocks", "unstack_encoder_blocks"]
