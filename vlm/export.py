"""Export a trained vlm model to an HF directory that transformers loads:

    python -m vlm.export --workdir=/tmp/vlm_lm_demo --out=/tmp/lm_hf [--step=N] [--model_type=llama]

The workdir's config (written by vlm.train) says what the model is:
  two_tower  -> CLIPModel / SiglipModel (vlm.convert.export_hf); --model_type 'clip' or 'siglip'
                (default: 'siglip' for a sigmoid-loss run, else 'clip')
  decoder_lm -> LlamaForCausalLM / Qwen2ForCausalLM / GemmaForCausalLM (vlm.convert.export_lm.export_hf_llm);
                --model_type forces one, else it follows from the model's layout
  vision_lm  -> LlavaForConditionalGeneration / LlavaNextForConditionalGeneration (export_hf_llava);
                --model_type is then the text model's type
A LoRA run (config.peft) is merged into the base weights first; scanned stacks are unrolled. A layout
HF has no class for is an error naming the field. Each family's exporter is registered by model_name
(`@register_exporter`, vlm.convert.registry) beside its HF layout code.
"""

from pathlib import Path
from typing import Any

import jax
import numpy as np


def export(
  workdir: str | Path, out: str | Path, step: int | None = None, model_type: str | None = None
) -> dict[str, Any]:
  """Writes the checkpoint of `workdir` (latest, or `step`) to `out`; returns the config.json written."""
  from vlm import checkpoint
  from vlm.convert.registry import exporter_for
  from vlm.load import load_workdir_config

  config = load_workdir_config(workdir)
  exporter = exporter_for(config.model_name, str(Path(workdir) / "config.json"))
  params = jax.tree.map(np.asarray, checkpoint.load_params(workdir, step))
  peft = config.get("peft")
  peft = peft.to_dict() if peft is not None and peft.get("method") not in (None, "", "none") else None
  return exporter(config, params, out, model_type=model_type, peft=peft)


def main(argv) -> None:
  del argv
  from absl import flags

  f = flags.FLAGS
  config = export(f.workdir, f.out, f.step, f.model_type)
  print(f"Wrote {f.out} ({config.get('model_type')}, {', '.join(config.get('architectures', []))})", flush=True)


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("workdir", None, "A vlm.train workdir.")
  flags.DEFINE_string("out", None, "The HF directory to write (config.json + model.safetensors).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("model_type", None, "HF model_type to write (two_tower: clip | siglip; LMs: the text type).")
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
