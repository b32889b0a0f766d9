"""Zero-shot labels for your own image: `python -m vlm.predict --workdir=DIR --image=cat.png --labels="a,b,c"`.

Loads the workdir's config and latest checkpoint, preprocesses the image with `data.pp_eval`,
embeds each label with the prompt templates (ensembled), and prints the labels ranked with their
probabilities (sigmoid of the logit for a model with a bias, as SigLIP; softmax over labels otherwise).
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vlm.data import get_metadata, get_tokenizer
from vlm.data.preprocess import apply_ops, parse_pp
from vlm.data.sources import decode_image
from vlm.evaluate import load_model_and_params, load_workdir_config

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def load_image(path: str | Path, pp: str) -> np.ndarray:
  """An image file -> [1, H, W, 3] float32 through the pp string (geometric ops, value range)."""
  try:
    img = decode_image(Path(path).read_bytes())
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read the image: {e}") from None
  ex = apply_ops(parse_pp(pp, "data.pp_eval"), {"image": img}, np.random.default_rng(0))
  return np.asarray(ex["image"], np.float32)[None]


def predict(workdir: str | Path, image: str | Path, labels: list[str], templates: list[str] | None = None,
            step: int | None = None) -> list[tuple[str, float]]:
  config = load_workdir_config(workdir)
  model, _, params = load_model_and_params(config, workdir, step)
  if templates is None:
    try:
      templates = list(get_metadata(config.data, "test").get("templates") or DEFAULT_TEMPLATES)
    except Exception:  # a source without metadata
      templates = list(DEFAULT_TEMPLATES)
  tok = get_tokenizer(config.data)
  ids = tok.encode_batch([t.format(label) for label in labels for t in templates], config.data.text_length,
                         config.data.add_bos, config.data.add_eos)
  x = load_image(image, config.data.pp_eval)
  zimg, ztxt, out = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(ids))
  ztxt = ztxt.reshape(len(labels), len(templates), -1).mean(1)
  ztxt = ztxt / jnp.linalg.norm(ztxt, axis=-1, keepdims=True)
  logits = out["scale"] * (zimg @ ztxt.T)[0]
  if out["bias"] is not None:
    probs = jax.nn.sigmoid(logits + out["bias"])
  else:
    probs = jax.nn.softmax(logits)
  order = np.argsort(-np.asarray(logits))
  return [(labels[i], float(probs[i])) for i in order]


def main(argv) -> None:
  del argv
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  labels = [s.strip() for s in f.labels.split(",") if s.strip()]
  if not labels:
    raise ValueError("--labels: give at least one label, e.g. --labels='red circle,blue star'")
  ranked = predict(f.workdir, f.image, labels, step=f.step)
  print(json.dumps([{"label": label, "prob": round(p, 4)} for label, p in ranked], indent=2), flush=True)


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "Workdir of a training run.")
  flags.DEFINE_string("image", None, "Path to an image file.")
  flags.DEFINE_string("labels", None, "Comma-separated candidate labels.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.mark_flags_as_required(["workdir", "image", "labels"])
  app.run(main)
