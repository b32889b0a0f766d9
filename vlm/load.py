"""Loading a run: the config a workdir had in force, its model and its parameters, or a published
checkpoint's (HF Hub directory, big_vision .npz; vlm.convert.published) in their place.

Evaluations, `vlm.evaluate`, `vlm.predict`, `vlm.export` and the curation models load through here;
it imports no evaluation, so an evaluation that needs another run (a judge) can use it.
"""

from pathlib import Path

import jax
import ml_collections

from vlm import checkpoint, parallel
from vlm.convert.published import is_published, load_published
from vlm.models import build_model
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
