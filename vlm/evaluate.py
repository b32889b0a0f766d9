"""Evaluate a checkpoint: `python -m vlm.evaluate --config=configs/siglip_b16.py:demo --workdir=DIR`.

Runs every evaluation in `config.evals` on the latest (or `--step`) checkpoint of the workdir and
prints one JSON object. Without --config, the workdir's config.json (written by vlm.train) is used.
"""

import json
from pathlib import Path
from typing import Any

import jax
import ml_collections

from vlm import checkpoint, parallel
from vlm.evals import build_evals
from vlm.models import build_model


def load_workdir_config(workdir: str | Path) -> ml_collections.ConfigDict:
  path = Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path}: not found; pass --config or train into this workdir first")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_model_and_params(config, workdir: str | Path, step: int | None = None):
  """(model, mesh, params placed on the mesh) for the checkpoint of `workdir`."""
  mesh = parallel.make_mesh(config.get("mesh", [("data", -1)]))
  model = build_model(config.model_name, config.model, peft=config.get("peft"))
  params = checkpoint.load_params(workdir, step)
  params = jax.device_put(params, parallel.replicated(mesh))
  return model, mesh, params


def evaluate(config, workdir: str | Path, step: int | None = None) -> dict[str, Any]:
  model, mesh, params = load_model_and_params(config, workdir, step)
  results: dict[str, Any] = {}
  for evaluator in build_evals(config, model, mesh).values():
    results.update(evaluator(params))
  return results


def main(argv) -> None:
  del argv
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  config = f.config if f.config is not None else load_workdir_config(f.workdir)
  print(json.dumps(evaluate(config, f.workdir, f.step), indent=2, sort_keys=True), flush=True)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file (default: <workdir>/config.json).")
  flags.DEFINE_string("workdir", None, "Workdir of a training run (or a checkpoints directory).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
