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

import jax
import ml_collections

from vlm import checkpoint, parallel
from vlm.evals import build_evals
from vlm.models import build_model
from vlm.nn.attention import attention_implementation
from vlm.workdir import latest_config


def load_workdir_config(workdir: str | Path, step: int | None = None) -> ml_collections.ConfigDict:
  """The config a run had in force at `step` (default: its newest): config.json or a config.<step>.json."""
  found = latest_config(workdir, step)
  if found is None:
    raise FileNotFoundError(
      f"{Path(workdir) / 'config.json'}: not found; pass --config or train into this workdir first"
    )
  return ml_collections.ConfigDict(found[1])


def load_model_and_params(config, workdir: str | Path, step: int | None = None, params=None):
  """(model, mesh, params placed on the mesh) for the checkpoint of `workdir` (or the given params)."""
  mesh = parallel.make_mesh(config.get("mesh", [("data", -1)]))
  model = build_model(config.model_name, config.model, peft=config.get("peft"))
  if params is None:
    params = checkpoint.load_params(workdir, step)
  params = jax.device_put(params, parallel.replicated(mesh))
  return model, mesh, params


def load_run(path: str | Path, step: int | None = None, tokenizer: str | None = None, config=None):
  """(config, model, mesh, params) of a vlm workdir, or of a published checkpoint (HF directory, big_vision
  .npz): then the config is vlm.convert.published's, or `config` with the published model, tokenizer
  and preprocessing put in (its evals and data kept)."""
  from vlm.convert.published import is_published, load_published

  if is_published(path):
    published, params = load_published(path, tokenizer=tokenizer)
    if config is not None:
      config = with_published(config, published)
    else:
      config = published
    return (config, *load_model_and_params(config, path, params=params))
  config = load_workdir_config(path, step) if config is None else config
  if tokenizer is not None:
    config.data.tokenizer = tokenizer
  return (config, *load_model_and_params(config, path, step))


def with_published(config, published):
  """`config` (evals, data source) running the published model: its model, tokenizer, lengths and pp_eval."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model_name = published.model_name
    config.model = published.model
    config.init = published.init
    for key in ("tokenizer", "tokenizer_family", "text_length", "add_bos", "add_eos", "pp_eval"):
      config.data[key] = published.data[key]
  return config


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
  from vlm.convert.published import is_published

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
