"""Tiny builders shared by the test files: demo configs cut to test size, tiny model sizes, and the
checks a learning test makes. Import as `from helpers import ...` (tests/ is on sys.path)."""

from typing import Any

import numpy as np

# A small embedded dataset for trainer-level tests (conftest's `data_dir` builds it once per process).
TINY_DATA = dict(num_train=1024, num_validation=64, num_test=256)

# Tiny VLM-on-an-LM parts: a GQA decoder LM over the embedded vocabulary (+ chat specials) and a ViT
# of 8 px patches (16 image tokens at 32 px).
TINY_LM = dict(vocab_size=1008, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64, tie_embeddings=True)
TINY_VISION = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8)
# Two-tower towers (SigLIP / CLIP / Llip demos).
TINY_TOWER = dict(width=32, depth=1, mlp_dim=64, num_heads=2)


IMAGE_TOKENS = 16  # TINY_VISION's image tokens at 32 px


def tiny_vision_lm(**kw):
  """A LLaVA-style VisionLanguageModel of TINY_LM and TINY_VISION (features of the second-last block);
  `kw` sets other fields (connector_type, num_soft_prompts, ...)."""
  from vlm.models.vision_lm import VisionLanguageModel

  return VisionLanguageModel(lm_config=TINY_LM, vision_config=TINY_VISION, feature_layer=-2, **kw)


def image_prompt(batch: int, images_per_row: int = 1, tail=(270, 268, 301)):
  """Token rows [batch, L] for tiny_vision_lm: BOS, <|user|>, IMAGE_TOKENS image placeholders per image,
  then `tail` (text ids)."""
  import jax.numpy as jnp

  row = [3, 1002] + [1000] * (IMAGE_TOKENS * images_per_row) + list(tail)
  return jnp.asarray(np.tile(row, (batch, 1)), jnp.int32)


def shrink(c, data_dir, steps: int, batch_size: int = 16, warmup_steps: int = 1):
  """Config `c` (a demo recipe) on the tiny embedded data: `steps` steps of `batch_size`, a log line
  every step, one checkpoint at the end, no TensorBoard. Model sizes and evals are left as they are."""
  c.data.data_dir = str(data_dir)
  c.data.builder.update(TINY_DATA)
  c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = batch_size, steps, 1, 1000
  if "schedule" in c and "warmup_steps" in c.schedule:
    c.schedule.warmup_steps = warmup_steps
  c.tensorboard = False
  return c


def tiny(module, data_dir, steps: int = 8, **over):
  """A two-tower demo (`module.get_config('demo')`: SigLIP, CLIP, Llip) with 1-block towers of width 32,
  evaluations only at the end of a run that asks for them (every=0, 64 examples); `over` sets top-level keys."""
  c = shrink(module.get_config("demo"), data_dir, steps, warmup_steps=2)
  c.model["image"].update(TINY_TOWER)
  c.model["text"].update(TINY_TOWER, out_dim=32)
  for name in ("zeroshot", "retrieval"):
    c.evals[name].every = 0
    c.evals[name].max_examples = 64
  for k, v in over.items():
    c[k] = v
  return c


def tiny_demo(data_dir, steps: int, **model_sizes):
  from configs import coca_b16

  c = coca_b16.get_config("demo")
  c.data.data_dir = str(data_dir)
  c.data.builder.update(TINY_DATA)
  sizes = dict(width=32, depth=1, mlp_dim=64, num_heads=2)
  sizes.update(model_sizes)
  c.model["image"].update(sizes)
  c.model["text"].update(
    width=sizes["width"], mlp_dim=sizes["mlp_dim"], num_heads=sizes["num_heads"], unimodal_depth=1, multimodal_depth=1
  )
  c.model["embed_dim"] = sizes["width"]
  c.batch_size = 16
  c.total_steps = steps
  c.log_every = 1
  c.checkpoint_every = 1000
  c.schedule.warmup_steps = 2
  for name in ("zeroshot", "retrieval", "captioning"):
    c.evals[name].every = 0
    c.evals[name].max_examples = 64
  c.evals.probe.update(every=0, train_examples=256, steps=20)
  c.tensorboard = False
  return c


def tiny_vlm(c, lm: dict | None = None, vision: dict | None = None):
  """A VLM-on-an-LM recipe with the tiny LM and vision sizes (model.lm_config / model.vision_config)."""
  c.model.lm_config.update(TINY_LM if lm is None else lm)
  if vision is not None or "vision_config" in c.model:
    c.model.vision_config.update(TINY_VISION if vision is None else vision)
  return c


def above_chance(value: float, threshold: float, what: str, *, baseline: float | None = None) -> None:
  """assert value >= threshold with a message naming the metric (and its chance / baseline value)."""
  base = "" if baseline is None else f" (chance / baseline {baseline:.3f})"
  assert value >= threshold, f"{what} = {value:.4f} < {threshold}{base}: the model did not learn"


def shuffled(x: Any, seed: int = 0) -> np.ndarray:
  """x with its leading axis permuted so that no row stays in place (a derangement): the images of
  another example, for 'does the model use the image' checks."""
  x = np.asarray(x)
  n = len(x)
  perm = np.roll(np.random.default_rng(seed).permutation(n), 1)
  order = np.empty(n, int)
  order[np.random.default_rng(seed).permutation(n)] = perm
  assert n < 2 or not (order == np.arange(n)).any()
  return x[order]


def vqa_accuracy(workdir, name: str = "vqa", shuffle_images: bool = False) -> float:
  """Exact-match accuracy of the workdir's `evals.<name>` (a vqa_generate eval) on its checkpoint;
  shuffle_images: every question is asked about another example's image (and its AnyRes layout), which
  leaves only what the LM can guess from the question."""
  from vlm.evals.base import build_evals
  from vlm.load import load_run

  config, model, mesh, params = load_run(workdir)
  ev = build_evals(config, model, mesh)[name]
  arrays = dict(ev.data()[0])
  if shuffle_images:
    for key in ("image", "image_layout"):
      if key in arrays:
        arrays[key] = shuffled(arrays[key])
  return ev.score(params, arrays)[f"{name}/accuracy"]


def flat_params(workdir) -> dict[str, np.ndarray]:
  """The workdir's newest checkpointed parameters as {'a/b/kernel': array}."""
  from flax import traverse_util

  from vlm import checkpoint

  return traverse_util.flatten_dict(checkpoint.load_params(workdir), sep="/")


def ridge_probe_accuracy(train_x, train_y, test_x, test_y, lam: float = 0.01) -> float:
  """Test accuracy of a ridge-regression classifier (one-hot targets, features standardised on the
  training set, penalty lam * N) fitted on frozen features [N, ...] and string labels."""
  train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
  train_x, test_x = train_x.reshape(len(train_x), -1), test_x.reshape(len(test_x), -1)
  mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
  train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
  classes = np.asarray(sorted(set(train_y)))
  onehot = (np.asarray(train_y)[:, None] == classes[None]).astype(np.float64)
  dual = np.linalg.solve(train_x @ train_x.T + lam * len(train_x) * np.eye(len(train_x)), onehot)
  pred = classes[np.argmax(test_x @ train_x.T @ dual, 1)]
  return float(np.mean(pred == np.asarray(test_y)))


def text_answers(c, split: str):
  """(images as the recipe's data.pp_eval makes them, answers) of its text-reading questions on `split`."""
  from vlm.data import get_tokenizer
  from vlm.data.pipeline import load_split_numpy

  arrays, _ = load_split_numpy(c.data, split)
  return arrays["image"], [a.strip() for a in get_tokenizer(c.data).decode_batch(arrays["answer"])]
