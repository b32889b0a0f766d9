"""VQTokenizer (vlm.models.vq): nearest codes, straight-through gradients, shapes, and learning."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import vq_tokenizer
from vlm import parallel
from vlm.checkpoint import load_params
from vlm.evals.reconstruction import Reconstruction
from vlm.metrics_writer import read_metrics
from vlm.models import MODELS, VQTokenizer, predict_fns
from vlm.objectives import OBJECTIVES
from vlm.train import train

from conftest import TINY_DATA

TINY = dict(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8, codebook_size=64, code_dim=8)


def _init(model, images, seed=0):
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), images)["params"])


def _images(shape=(2, 16, 24, 3), seed=1):
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


def test_registered():
  assert MODELS.get("vq_tokenizer") is VQTokenizer
  assert OBJECTIVES.get("vq") is not None


def test_nearest_code_is_brute_force_cosine_argmax():
  model = VQTokenizer(**TINY)
  x = _images()
  params = _init(model, x)
  codes = np.asarray(model.apply({"params": params}, x, method=VQTokenizer.encode))
  assert codes.shape == (2, 2, 3) and codes.dtype == np.int32
  z = np.asarray(model.apply({"params": params}, x, method=VQTokenizer.embed), np.float64)
  z_raw = z / np.linalg.norm(z, axis=-1, keepdims=True)
  cb = np.asarray(params["codebook"], np.float64)
  cos = np.einsum("bhwd,kd->bhwk", z_raw, cb / np.linalg.norm(cb, axis=-1, keepdims=True))
  best = cos.argmax(-1)
  chosen = np.take_along_axis(cos, codes[..., None].astype(np.int64), -1)[..., 0]
  np.testing.assert_allclose(chosen, cos.max(-1), atol=1e-6)  # ties aside, the same index
  assert (codes == best).mean() > 0.9


@pytest.mark.slow
def test_straight_through_gradient_and_eval_forward_equals_decode_encode():
  model = VQTokenizer(**TINY)
  x = _images()
  params = _init(model, x)
  recon, aux = model.apply({"params": params}, x)
  assert recon.shape == x.shape
  assert aux["codes"].shape == (2, 2, 3)
  codes = model.apply({"params": params}, x, method=VQTokenizer.encode)
  np.testing.assert_array_equal(np.asarray(aux["codes"]), np.asarray(codes))
  decoded = model.apply({"params": params}, codes, method=VQTokenizer.decode)
  np.testing.assert_allclose(np.asarray(recon), np.asarray(decoded), atol=1e-5)

  def recon_loss(p):
    r, _ = model.apply({"params": p}, x, train=True)
    return jnp.mean(jnp.square(r - x))

  grads = jax.grad(recon_loss)(params)
  # The reconstruction alone reaches the encoder only through the straight-through estimator.
  enc_norm = sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(grads["encoder"]))
  emb_norm = sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(grads["embedding"]))
  assert enc_norm > 0 and emb_norm > 0
  # ... and never the codebook (its only gradient is the codebook loss).
  assert float(jnp.abs(grads["codebook"]).max()) == 0.0

  def vq_loss(p):
    _, a = model.apply({"params": p}, x, train=True)
    return a["codebook_loss"]

  assert float(jnp.abs(jax.grad(vq_loss)(params)["codebook"]).max()) > 0


def test_shapes_and_errors():
  model = VQTokenizer(**TINY)
  params = _init(model, _images((1, 16, 16, 3)))
  assert set(params) == {"embedding", "encoder", "codebook", "decoder_in", "decoder"}
  assert params["codebook"].shape == (64, 8)
  with pytest.raises(ValueError, match=r"\(16, 20\).*patch_size 8"):
    model.apply({"params": params}, _images((1, 16, 20, 3)), method=VQTokenizer.encode)
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    model.apply({"params": params}, jnp.zeros((1, 16, 16)))
  out = model.apply({"params": params}, jnp.zeros((3, 2, 2), jnp.int32), method=VQTokenizer.decode)
  assert out.shape == (3, 16, 16, 3)


@pytest.mark.slow
def test_latent_tokens_one_dimensional_codes():
  """TiTok mode: K codes per image read from learned latent tokens, not one per patch."""
  model = VQTokenizer(**TINY, latent_tokens=5, image_size=16)
  x = _images((2, 16, 16, 3))
  params = _init(model, x)
  assert params["latents"].shape == (5, 32) and params["mask_token"].shape == (1, 32)
  assert model.code_grid((16, 16)) == (1, 5) and VQTokenizer(**TINY).code_grid((16, 24)) == (2, 3)
  assert VQTokenizer(**vq_tokenizer.get_config("demo_1d").model).code_grid((32, 32)) == (1, 16)
  recon, aux = model.apply({"params": params}, x)
  codes = model.apply({"params": params}, x, method=VQTokenizer.encode)
  assert recon.shape == x.shape and codes.shape == (2, 1, 5)
  np.testing.assert_array_equal(np.asarray(aux["codes"]), np.asarray(codes))
  np.testing.assert_allclose(
    np.asarray(recon), np.asarray(model.apply({"params": params}, codes, method=VQTokenizer.decode)), atol=1e-5
  )
  # Every latent code sees the whole image: a change in one corner patch reaches each latent.
  z = model.apply({"params": params}, x, method=VQTokenizer.embed)
  z2 = model.apply({"params": params}, x.at[:, :8, :8].set(0.0), method=VQTokenizer.embed)
  assert float(jnp.abs(z - z2).max(axis=-1).min()) > 0
  grads = jax.grad(lambda p: jnp.mean(jnp.square(model.apply({"params": p}, x, train=True)[0] - x)))(params)
  assert float(jnp.abs(grads["latents"]).max()) > 0 and float(jnp.abs(grads["mask_token"]).max()) > 0
  with pytest.raises(ValueError, match="image_size"):
    _init(VQTokenizer(**TINY, latent_tokens=5), x)
  with pytest.raises(ValueError, match=r"image_size=16.*\(24, 24\)"):
    model.apply({"params": params}, _images((1, 24, 24, 3)), method=VQTokenizer.encode)


@pytest.mark.slow
def test_objective_metrics():
  model = VQTokenizer(**TINY)
  x = _images((4, 16, 16, 3))
  params = _init(model, x)
  obj = OBJECTIVES.get("vq")(entropy_weight=0.1)
  assert obj.init_args({"image": x})[0].shape == (1, 16, 16, 3)
  loss, metrics = obj(model, params, {"image": x}, rng=jax.random.key(0), train=True)
  expected = metrics["recon_mse"] + metrics["codebook_loss"] + 0.25 * metrics["commit_loss"]
  assert float(loss) != pytest.approx(float(expected))  # the entropy term is on
  codes = np.asarray(model.apply({"params": params}, x, method=VQTokenizer.encode)).ravel()
  p = np.bincount(codes, minlength=64) / codes.size
  assert float(metrics["usage"]) == pytest.approx(np.mean(p > 0))
  assert float(metrics["perplexity"]) == pytest.approx(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))), rel=1e-5)
  plain, _ = OBJECTIVES.get("vq")()(model, params, {"image": x}, rng=jax.random.key(0), train=True)
  assert float(plain) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.slow
def test_demo_config_learns(tmp_path, data_dir):
  """100 steps of a width-32 tokenizer on the embedded scenes, at lr 5e-3.

  The reconstruction must beat the mean test image (MSE 0.063; 40 steps at the demo's lr reach only
  0.073, with reconstructions that hardly depend on their input) and be closer to its own image than
  to another image of the split. Measured over seeds 0-2: MSE 0.051-0.054 (threshold 0.057),
  own / other MSE 0.58-0.66 (threshold 0.75), PSNR +6.9-7.2 dB over the untrained model (threshold 5.5)."""
  c = vq_tokenizer.get_config("demo")
  c.data.data_dir = str(data_dir)
  c.data.builder.update(TINY_DATA)
  c.model.update(width=32, depth=1, mlp_dim=64, num_heads=2, codebook_size=64, code_dim=8)
  c.batch_size = 32
  c.total_steps = 100
  c.lr = 5e-3
  c.log_every = 50
  c.checkpoint_every = 1000
  c.schedule.warmup_steps = 5
  c.evals.reconstruction.max_examples = 64
  c.tensorboard = False
  out = train(c, tmp_path)
  rows = [r for r in read_metrics(tmp_path) if "reconstruction/mse" in r]
  assert [r["step"] for r in rows] == [0, 100]
  before, after = rows[0], rows[-1]
  assert 0 < after["reconstruction/usage"] <= 1 and after["reconstruction/perplexity"] > 1
  assert out["train/recon_mse"] < before["reconstruction/mse"]

  mesh = parallel.make_mesh([("data", -1)])
  model = VQTokenizer(**c.model)
  arrays, _ = Reconstruction(
    data=c.data, rules=c.rules, predict_fns=predict_fns(model), mesh=mesh, prefix="r", split="test", max_examples=64
  ).data()
  images = jnp.asarray(arrays["image"])
  mean_image = float(jnp.mean(jnp.square(images - images.mean(0))))
  recon, _ = model.apply({"params": load_params(tmp_path)}, images)
  own = float(jnp.mean(jnp.square(recon - images)))
  other = float(jnp.mean(jnp.square(recon - jnp.roll(images, 1, axis=0))))
  assert own == pytest.approx(after["reconstruction/mse"], rel=1e-4)  # the eval saw these images
  assert after["reconstruction/mse"] < 0.9 * mean_image
  assert own < 0.75 * other
  assert after["reconstruction/psnr"] > before["reconstruction/psnr"] + 5.5
