"""Llip: caption-conditioned image embeddings over K mixture tokens, its config and its training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import llip_b16
from vlm.metrics_writer import read_metrics
from vlm.models import Llip
from vlm.models.llip import llip_image_embedding, llip_similarity
from vlm.train import train

from helpers import tiny

IMAGE = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8)
TEXT = dict(width=32, depth=1, mlp_dim=64, num_heads=2, vocab_size=50, max_len=8, pool_type="last", out_dim=32)


def _model(k: int = 4, heads: int = 4) -> tuple[Llip, dict, dict, dict]:
  model = Llip(image=IMAGE, text=TEXT, num_mixture_tokens=k, num_heads=heads)
  images = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
  tokens = jax.random.randint(jax.random.key(2), (5, 8), 4, 50)
  params = jax.jit(model.init)(jax.random.key(0), images, tokens)["params"]
  img, txt, _ = model.apply({"params": params}, images, tokens)
  return model, params, img, txt


@pytest.mark.slow
def test_image_embedding_changes_with_the_caption():
  _, _, img, txt = _model()
  assert img["keys"].shape == img["values"].shape == (3, 4, 4, 8)
  assert txt["query"].shape == (5, 4, 8) and txt["z"].shape == (5, 32)
  z = llip_image_embedding(img, txt, 5.0)  # [images, captions, D]
  assert z.shape == (3, 5, 32)
  np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)
  # One image, different captions: different embeddings.
  gaps = jnp.linalg.norm(z[:, :, None] - z[:, None, :], axis=-1)  # [I, J, J]
  off = ~np.eye(5, dtype=bool)
  assert float(gaps[:, off].min()) > 1e-3, gaps
  # With a single mixture token the attention is 1 whatever the caption: the check has teeth.
  _, _, img1, txt1 = _model(k=1)
  z1 = llip_image_embedding(img1, txt1, 5.0)
  np.testing.assert_allclose(z1, jnp.broadcast_to(z1[:, :1], z1.shape), atol=1e-6)


@pytest.mark.slow
def test_similarity_matches_a_per_pair_loop():
  """Eq. of Llip sec. 3, pair by pair, head by head, in float64 numpy."""
  _, _, img, txt = _model(heads=2)
  keys, values = np.asarray(img["keys"], np.float64), np.asarray(img["values"], np.float64)
  query, zt = np.asarray(txt["query"], np.float64), np.asarray(txt["z"], np.float64)
  want = np.zeros((3, 5))
  for i in range(3):
    for j in range(5):
      heads = []
      for h in range(2):
        a = keys[i, :, h] @ query[j, h] / 5.0
        a = np.exp(a - a.max())
        heads.append((a / a.sum()) @ values[i, :, h])
      zi = np.concatenate(heads)
      want[i, j] = zi @ zt[j] / np.linalg.norm(zi) / np.linalg.norm(zt[j])
  np.testing.assert_allclose(llip_similarity(img, txt, 5.0), want, atol=1e-5)


def test_config_errors_name_the_key():
  images, tokens = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="model.image.pool_type"):
    Llip(image=dict(IMAGE, pool_type="map"), text=TEXT).init(jax.random.key(0), images, tokens)
  with pytest.raises(ValueError, match="model.text.out_dim"):
    Llip(image=IMAGE, text=dict(TEXT, out_dim=None)).init(jax.random.key(0), images, tokens)
  with pytest.raises(ValueError, match="num_heads=5"):
    Llip(image=IMAGE, text=TEXT, num_heads=5).init(jax.random.key(0), images, tokens)


def test_b16_recipe_numbers():
  c = llip_b16.get_config()
  assert (c.model.num_mixture_tokens, c.model.num_heads, c.model.attn_temperature) == (32, 8, 5.0)
  assert c.model.bias_init == -10.0 and c.objective.loss == "sigmoid" and c.objective.impl == "ring"


@pytest.mark.slow
def test_demo_learns_with_conditioned_embeddings(data_dir, tmp_path):
  """A lighter demo on the ring loss over 8 devices: zero-shot (scored with the caption-conditioned
  image embeddings) and retrieval well above chance after 100 steps."""
  c = tiny(llip_b16, data_dir, steps=100)
  c.model["image"].update(width=64, depth=2, mlp_dim=128, num_heads=4)
  c.model["text"].update(width=64, depth=1, mlp_dim=128, num_heads=4, out_dim=64)
  c.objective.impl = "ring"
  c.batch_size = 64
  c.evals.zeroshot.max_examples = 256
  c.evals.retrieval.max_examples = 256
  out = train(c, tmp_path)
  rows = [r for r in read_metrics(tmp_path) if "train/loss" in r]
  assert rows[-1]["train/loss"] < 0.8 * rows[0]["train/loss"]
  assert out["zeroshot/top1_seen"] > 5 * out["zeroshot/chance"], out
  assert out["retrieval/i2t_r5"] > 0.1, out
