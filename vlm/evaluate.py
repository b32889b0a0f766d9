"""Evaluate a checkpoint: `python -m vlm.evaluate --config=configs/siglip_b16.py:demo --workdir=DIR`.

Runs every evaluation in `config.evals` on the latest (or `--step`) checkpoint of the workdir and
prints one JSON object. Without --config, the workdir's config is used: config.json (written by vlm.train
at the first start), or the newest config.<step>.json a resume with changed keys recorded (vlm.workdir).

A published checkpoint (an HF Hub directory or a big_vision .npz, vlm.convert.published) is evaluated
with `--init=PATH` (or as `--workdir=PATH`): its model, parameters, tokenizer and preprocessing replace
the config's, and the config gives the evaluations and their data:

    python -m vlm.evaluate --config=configs/siglip_b16.py:demo --init=/path/to/siglip-base-patch16-224
"""

import json
from pathlib import Path
from typing import Any

from vlm.convert.published import is_published
from vlm.evals import build_evals
from vlm.load import load_run, load_workdir_config
from vlm.nn.attention import attention_implementation


def evaluate(
  config, workdir: str | Path, step: int | None = None, init: str | Path | None = None, tokenizer: str | None = None
) -> dict[str, Any]:
  """Every eval of `config` on the workdir's checkpoint, or on the published checkpoint `init`."""
  config, model, mesh, params = load_run(init or workdir, step, tokenizer, config)
  results: dict[str, Any] = {}
  with attention_implementation(config.get("attention_impl")):
    for evaluator in build_evals(config, model, mesh).values():
      results.update(evaluator(params))
  return results


def main(argv) -> None:
  del argv
  from absl import flags, logging

  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  init = f.init or (f.workdir if f.workdir and is_published(f.workdir) else None)
  if f.workdir is None and init is None:
    raise ValueError("pass --workdir (a training run) or --init (an HF directory or big_vision .npz)")
  if init is not None and f.config is None:
    raise ValueError(
      f"--init={init}: a published checkpoint has no evals; pass --config with the evaluations "
      "to run, e.g. --config=configs/siglip_b16.py:demo"
    )
  config = f.config if f.config is not None else load_workdir_config(f.workdir, f.step)
  print(
    json.dumps(evaluate(config, f.workdir, f.step, init=init, tokenizer=f.tokenizer), indent=2, sort_keys=True),
    flush=True,
  )


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Config file (default: <workdir>/config.json).")
  flags.DEFINE_string("workdir", None, "Workdir of a training run (or a checkpoints directory).")
  flags.DEFINE_string("init", None, "A published checkpoint: HF directory or big_vision .npz (evaluated instead).")
  flags.DEFINE_string("tokenizer", None, "Tokenizer file or directory (default: the run's / the checkpoint's).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  app.run(main)
