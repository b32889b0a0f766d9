"""Where does text-to-image lose the prompt? The tokenizer or the decoder (early-fusion demo).

Trains a small CNN with a colour head and a shape head on the VQ tokenizer's reconstructions of
training images (so it reads what the tokens can express, blur included), then reports its
colour / shape / both accuracy on the real test images, on their reconstructions (the image
tokens' ceiling for a judge used to that rendering) and on the images the early-fusion model
generates from the test captions (seen / held-out combinations apart). The gap between the last
two is the decoder's; the gap between the first two, the tokenizer's.

    python experiments/t2i_probe.py --workdir=/tmp/chameleon_demo [--steps=1500 --train_examples=12000]

Prints one JSON line per image set. The factorised heads (one softmax over colours, one over
shapes) also judge combinations never seen in training.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `configs`

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from vlm import parallel  # noqa: E402
from vlm.data import load_split_numpy  # noqa: E402
from vlm.evals.base import batched_apply, jit_on_mesh  # noqa: E402
from vlm.load import load_model_and_params, load_workdir_config  # noqa: E402
from vlm.models.early_fusion import generate_images  # noqa: E402


class AttributeCNN(nn.Module):
  """Images [B, H, W, 3] -> (colour logits [B, C], shape logits [B, S])."""

  colours: int
  shapes: int

  @nn.compact
  def __call__(self, x):
    for features in (32, 64, 128):
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Dense(128)(x.mean(axis=(1, 2))))
    return nn.Dense(self.colours)(x), nn.Dense(self.shapes)(x)


def attributes(labels: np.ndarray, class_names: list[str]) -> tuple[np.ndarray, list[str], list[str]]:
  """Class labels [N] of '<colour> <shape>' names -> ([N, 2] (colour, shape) indices, colours, shapes)."""
  colours = sorted({n.split(" ", 1)[0] for n in class_names})
  shapes = sorted({n.split(" ", 1)[1] for n in class_names})
  pairs = [n.split(" ", 1) for n in np.asarray(class_names)[labels]]
  return np.asarray([(colours.index(c), shapes.index(s)) for c, s in pairs]), colours, shapes


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True, help="an early-fusion run (configs/chameleon.py)")
  ap.add_argument("--train_examples", type=int, default=12000)
  ap.add_argument("--test_examples", type=int, default=500)
  ap.add_argument("--steps", type=int, default=1500)
  ap.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance of the generation")
  args = ap.parse_args()
  config = load_workdir_config(args.workdir)
  config.data.caption_key = "caption"  # the prompts: the canonical captions, as the text_to_image eval
  model, mesh, params = load_model_and_params(config, args.workdir)
  if not hasattr(model, "code_grid"):
    raise SystemExit(f"--workdir={args.workdir}: not an early-fusion run (model {config.model_name!r})")
  train, meta = load_split_numpy(config, "train", max_examples=args.train_examples)
  test, _ = load_split_numpy(config, "test", max_examples=args.test_examples)
  grid = model.code_grid(test["image"].shape[1:3])
  rules = config.get("rules", parallel.DEFAULT_RULES)
  recon_fn = jit_on_mesh(lambda p, x: model.apply({"params": p}, x, method=model.reconstruct), mesh, rules)

  def recon(x):
    return np.clip(batched_apply(recon_fn, params, x, mesh, 256), -1, 1)

  names = list(meta["class_names"])
  y_train, colours, shapes = attributes(train["label"], names)
  y_test, _, _ = attributes(test["label"], names)
  x_train = recon(train["image"])

  cnn = AttributeCNN(len(colours), len(shapes))
  cnn_params = cnn.init(jax.random.key(0), x_train[:1])
  opt = optax.adam(1e-3)
  opt_state = opt.init(cnn_params)

  @jax.jit
  def step(p, s, x, y):
    def loss(p):
      c, sh = cnn.apply(p, x)
      return (
        optax.softmax_cross_entropy_with_integer_labels(c, y[:, 0]).mean()
        + optax.softmax_cross_entropy_with_integer_labels(sh, y[:, 1]).mean()
      )

    value, grads = jax.value_and_grad(loss)(p)
    updates, s = opt.update(grads, s)
    return optax.apply_updates(p, updates), s, value

  rng = np.random.default_rng(0)
  for i in range(args.steps):
    idx = rng.integers(0, len(x_train), 128)
    cnn_params, opt_state, value = step(cnn_params, opt_state, x_train[idx], y_train[idx])
  print(json.dumps(dict(probe_train_loss=round(float(value), 4), steps=args.steps)), flush=True)

  predict = jax.jit(lambda x: [jnp.argmax(o, -1) for o in cnn.apply(cnn_params, x)])
  gen_fn = jit_on_mesh(lambda p, t: generate_images(model, p, t, grid, guidance=args.guidance)[1], mesh, rules)
  seen = test["seen"].astype(bool)
  sets = {
    "real": test["image"],
    "reconstructed": recon(test["image"]),
    "generated": np.clip(batched_apply(gen_fn, params, test["text"], mesh, 256), -1, 1),
  }
  for name, images in sets.items():
    c, s = (np.asarray(v) for v in predict(images))
    colour, shape = c == y_test[:, 0], s == y_test[:, 1]
    both = colour & shape
    print(
      json.dumps(
        dict(
          images=name,
          colour=round(float(colour.mean()), 4),
          shape=round(float(shape.mean()), 4),
          both=round(float(both.mean()), 4),
          both_seen=round(float(both[seen].mean()), 4),
          both_unseen=round(float(both[~seen].mean()), 4) if (~seen).any() else None,
        )
      ),
      flush=True,
    )


if __name__ == "__main__":
  main()
