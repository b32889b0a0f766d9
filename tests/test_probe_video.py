"""VideoClassifier, the frozen-feature attentional probe and the classification objective / eval."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image

from configs import siglip_b16
from configs.common import base_config
from vlm import parallel
from vlm.data import embedded, scenes
from vlm.evals import build_evals
from vlm.evals import classification as _classification_evals  # noqa: F401  (registers 'classify')
from vlm.evals.probe import Probe
from vlm.models import MODELS, build_model
from vlm.models.video import VideoClassifier
from vlm.objectives.classification import Classification  # (registers 'classification')
from vlm.train import train

# Registering the same class again is a no-op, so this stays valid once vlm.models registers it.
MODELS.register("video_classifier")(VideoClassifier)

TINY_VIDEO = dict(num_train=512, num_validation=64, num_test=128, num_frames=4, image_size=16)
TINY_VIT = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("video_data")
  embedded.build(str(d), **TINY_VIDEO)
  return d


def _video_model(**kw) -> VideoClassifier:
  return VideoClassifier(image=TINY_VIT, num_classes=4, num_frames=4, **kw)


def _frames(seed: int = 0, batch: int = 2) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, 4, 32, 32, 3))


@functools.lru_cache(maxsize=None)
def _video(temporal_embedding: bool = True):
  """(params, jitted apply(params, x, method=None)) of a tiny VideoClassifier, made once per variant
  (jitted: flax's eager init compiles every op on its own, slow on the 8 simulated CPU devices).
  Without the temporal embedding: the same parameters less that one."""
  model = _video_model(temporal_embedding=temporal_embedding)
  if temporal_embedding:
    params = jax.jit(lambda k, x: nn.meta.unbox(model.init(k, x))["params"])(jax.random.key(0), _frames())
  else:
    params = _video(True)[0]
    params = {**params, "head": {k: v for k, v in params["head"].items() if k != "temporal_embedding"}}
  apply = jax.jit(lambda p, x, method=None: model.apply({"params": p}, x, method=method), static_argnames="method")
  return params, apply


# ---------------------------------------------------------------- VideoClassifier


def test_video_classifier_shapes_and_parameters():
  x = _frames()
  params, apply = _video()
  logits, aux = apply(params, x)
  assert logits.shape == (2, 4) and logits.dtype == jnp.float32
  assert aux["tokens"].shape == (2, 4, 16, 32)  # [B, F, (32/8)^2, width]
  assert set(params) == {"img", "head"}
  assert "MAPHead" not in params["img"] and "head" not in params["img"]  # pool_type='none', no projection
  assert params["head"]["temporal_embedding"].shape == (4, 32)
  z, img_aux = apply(params, x[:, 0], method="encode_image")
  assert z.shape == (2, 32) and img_aux["encoded"].shape == (2, 16, 32)
  with pytest.raises(ValueError, match="frames"):
    apply(params, x[:, :3])


def test_frames_are_encoded_independently():
  x = _frames()
  params, apply = _video()
  tokens = apply(params, x)[1]["tokens"]
  changed = apply(params, x.at[0, 2].set(-x[0, 2]))[1]["tokens"]
  diff = np.abs(np.asarray(changed - tokens)).max(axis=(2, 3))  # [B, F]
  assert diff[0, 2] > 1e-2
  np.testing.assert_array_equal(np.delete(diff.reshape(-1), 2), 0.0)  # every other frame, and example 1


def test_temporal_embedding_makes_frame_order_matter():
  x = _frames()
  for temporal in (False, True):
    params, apply = _video(temporal)
    a, b = apply(params, x)[0], apply(params, x[:, ::-1])[0]
    if temporal:
      assert np.abs(np.asarray(a - b)).max() > 1e-3
    else:
      np.testing.assert_allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------- probe


def _probe_config(data: ml_collections.ConfigDict, **probe) -> ml_collections.ConfigDict:
  c = base_config()
  c.data = data
  c.evals = ml_collections.ConfigDict(dict(probe=dict(type="probe", **probe)))
  return c


def _init(model: nn.Module, mesh, *args):
  return parallel.init_sharded(
    lambda r: model.init(r, *args)["params"], mesh, parallel.DEFAULT_RULES, jax.random.key(0)
  )[0]


@pytest.mark.slow
def test_probe_on_a_random_two_tower(data_dir):
  """Top-1 in [0, 1], the same on a second call, and the model's parameters untouched."""
  c = siglip_b16.get_config("demo")
  c.data.data_dir = str(data_dir)
  c.data.builder.update(TINY_VIDEO)
  c.evals = ml_collections.ConfigDict(
    dict(probe=dict(type="probe", train_examples=128, test_examples=64, steps=10, batch_size=64))
  )
  mesh = parallel.make_mesh(c.mesh)
  model = build_model(c.model_name, c.model)
  params = _init(model, mesh, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), jnp.int32))
  before = jax.device_get(params)
  probe = build_evals(c, model, mesh)["probe"]
  first, second = probe(params), probe(params)
  assert 0.0 <= first["probe/top1"] <= 1.0 and "probe/top1_seen" in first
  assert first == second
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), before)


PALETTE = tuple(scenes.COLOURS.values())


class ColourTokens(nn.Module):
  """A stand-in encoder: tokens one-hot the nearest palette colour of each 4x4 patch, or are constant."""

  informative: bool = True

  def setup(self):
    self.w = self.param("w", nn.initializers.ones, (1,))

  def encode_image(self, images: jax.Array, train: bool = False):
    b, h, w, _ = images.shape
    patches = images.reshape(b, h // 4, 4, w // 4, 4, 3).mean(axis=(2, 4)).reshape(b, -1, 1, 3)
    palette = jnp.asarray(PALETTE, jnp.float32) / 127.5 - 1
    tokens = jax.nn.one_hot(jnp.argmin(jnp.sum((patches - palette) ** 2, -1), -1), len(PALETTE)) * self.w
    if not self.informative:
      tokens = jnp.ones_like(tokens)
    return tokens.mean(1), {"encoded": tokens}

  def __call__(self, images: jax.Array, train: bool = False):
    return self.encode_image(images, train)


@pytest.fixture(scope="module")
def colour_manifest(tmp_path_factory, data_dir):
  """jsonl splits of 16 px noisy solid-colour images; label = colour index (8 classes, balanced)."""
  d = tmp_path_factory.mktemp("colours")
  rng = np.random.default_rng(0)
  for split, n in (("train", 256), ("test", 64)):
    rows = []
    for i in range(n):
      label = i % len(PALETTE)
      img = np.clip(np.asarray(PALETTE[label]) + rng.normal(0, 10, (16, 16, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(img).save(d / f"{split}_{i}.png")
      rows.append(json.dumps({"image": f"{split}_{i}.png", "caption": "a square", "label": label}))
    (d / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
  data = base_config().data
  data.source = f"jsonl:{d}/{{split}}.jsonl"
  data.tokenizer = embedded.tokenizer_path(str(data_dir), **TINY_VIDEO)
  data.pp_eval = "decode|value_range(-1, 1)"
  return data


@pytest.mark.slow
@pytest.mark.parametrize("informative", [True, False], ids=["colour_tokens", "constant_tokens"])
def test_probe_learns_from_informative_tokens_only(colour_manifest, informative):
  """The can-fail check: tokens that encode the label give a near-perfect probe, constant tokens chance."""
  model = ColourTokens(informative=informative)
  mesh = parallel.make_mesh([("data", -1)])
  params = _init(model, mesh, jnp.zeros((1, 16, 16, 3)))
  # A stand-in model, not a registered family: the probe gets its predict function directly.
  features = {"image_features": lambda p, x: model.apply({"params": p}, x, method=ColourTokens.encode_image)[1]}
  c = _probe_config(colour_manifest)
  probe = Probe(
    data=c.data,
    rules=parallel.DEFAULT_RULES,
    predict_fns=features,
    mesh=mesh,
    prefix="probe",
    steps=100,
    batch_size=64,
    lr=3e-3,
  )
  top1 = probe(params)["probe/top1"]
  if informative:
    assert top1 > 0.95, top1
  else:
    assert top1 < 0.3, top1


# ---------------------------------------------------------------- objective and trainer


class _Logits(nn.Module):
  """model(x) -> (x, {}): the inputs are the logits."""

  def __call__(self, x, train: bool = False):
    return x, {}


def test_classification_objective_skips_negative_labels():
  logits = jnp.asarray([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [5.0, 0.0, 0.0]])
  batch = {"image": logits, "label": jnp.asarray([0, 2, -1])}
  objective = Classification(input_key="image", label_key="label")
  assert objective.init_args(batch)[0].shape == (1, 3)
  loss, metrics = jax.jit(lambda b: objective(_Logits(), {}, b, rng=jax.random.key(0), train=True))(batch)
  expected = optax.softmax_cross_entropy_with_integer_labels(logits[:2], batch["label"][:2]).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], 0.5)
  smoothed, _ = Classification("image", "label", label_smoothing=0.1)(
    _Logits(), {}, batch, rng=jax.random.key(0), train=False
  )
  assert smoothed > loss


def video_config(data_dir, steps: int, batch_size: int) -> ml_collections.ConfigDict:
  """VideoClassifier on the scenes' motion (left/right/up/down), from scratch.

  The object moves 0.12 of the image over the 4 frames (half an 8-px patch at 32 px). The pooler
  can contrast frames only through heads that attend to different frames, so training sits at
  chance, then jumps. What brought the jump into this budget: 16-px clips with 4-px patches and
  sin-cos positions (16 tokens a frame), a ViT of depth 3 and width 64 (depth 1 or width 32 stayed
  at chance), 8 pooler heads, the temporal embedding at the tokens' scale (AttentionalProbe), a
  constant lr of 2e-3 and Adam b2 = 0.95. No flip_lr (it would be safe: it swaps left/right motion labels).
  """
  c = base_config()
  c.model_name = "video_classifier"
  c.model = dict(
    image=dict(width=64, depth=3, mlp_dim=128, num_heads=2, patch_size=4, posemb="sincos2d"),
    num_classes=4,
    num_frames=4,
    num_heads=8,
  )
  c.objective_name = "classification"
  c.objective = ml_collections.ConfigDict(dict(input_key="frames", label_key="motion"))
  c.data.data_dir = str(data_dir)
  c.data.builder.update(TINY_VIDEO)
  c.data.with_frames = True
  c.data.pp_train = "decode|value_range(-1, 1)"
  c.data.pp_eval = "decode|value_range(-1, 1)"
  c.data.text_length = 16
  c.batch_size = batch_size
  c.total_steps = steps
  c.lr = 2e-3
  c.optimizer_kw.b2 = 0.95
  c.schedule = ml_collections.ConfigDict(dict(name="constant", warmup_steps=10))
  c.log_every = 25
  c.checkpoint_every = 1000
  c.tensorboard = False
  c.evals = ml_collections.ConfigDict(
    dict(classify=dict(type="classify", every=0, split="test", input_key="frames", label_key="motion"))
  )
  return c


@pytest.mark.slow
def test_video_classifier_learns_motion(data_dir, tmp_path):
  """Through the trainer: top-1 on the test clips' motion well above chance (0.25); the frozen-feature
  probe (frames=True, its own temporal embedding) on the trained ViT's tokens learns it too."""
  c = video_config(data_dir, steps=250, batch_size=32)
  c.evals.probe = dict(
    type="probe", every=0, frames=True, label_key="motion", train_examples=256, steps=100, batch_size=64, num_heads=8
  )
  out = train(c, tmp_path)
  print({k: round(v, 3) for k, v in out.items() if k.startswith(("classify/", "probe/"))})
  assert out["classify/top1"] > 0.5, out
  assert out["probe/top1"] > 0.5, out


def test_sample_frames_in_the_pipeline_keeps_the_chosen_frames_of_each_clip(data_dir):
  """pp_eval's sample_frames: the batch's clips [N, 2, H, W, 3] are frames 0 and 3 of the 4-frame clips."""
  from vlm.data import load_split_numpy

  c = video_config(data_dir, steps=1, batch_size=8)
  full, _ = load_split_numpy(c.data, "test", max_examples=16)
  c.data.pp_eval = "decode|sample_frames(2)|value_range(-1, 1)"
  kept, _ = load_split_numpy(c.data, "test", max_examples=16)
  assert full["frames"].shape[1] == 4 and kept["frames"].shape == (16, 2, *full["frames"].shape[2:])
  np.testing.assert_array_equal(kept["frames"], full["frames"][:, [0, 3]])
  np.testing.assert_array_equal(kept["motion"], full["motion"])
