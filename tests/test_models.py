"""ViT / text towers and the two-tower model: variants, shapes, published inits, LiT freezing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm.models import VIT_VARIANTS, TextTransformer, ViT, build_model, decode_variant
from vlm.models.two_tower import CLIP_TEMPERATURE_INIT


def test_variants():
  assert decode_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=(16, 16))
  assert decode_variant("So400m/14")["width"] == 1152
  assert decode_variant("L/14x7")["patch_size"] == (14, 7)
  assert decode_variant("g")["depth"] == 40
  assert {"Ti", "S", "M", "B", "L", "So400m", "H", "g"} <= set(VIT_VARIANTS)
  with pytest.raises(ValueError, match="unknown variant"):
    decode_variant("Q/16")


def test_vit_abstract_shapes_of_b16():
  """A full B/16 by eval_shape: the parameter count of ViT-B/16 (86M without a head)."""
  vit = ViT(variant="B/16", pool_type="gap", class_token=False)
  shapes = jax.eval_shape(vit.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  n = sum(int(np.prod(x.value.shape)) for x in jax.tree.leaves(shapes, is_leaf=lambda x: hasattr(x, "value")))
  assert 85e6 < n < 87e6


@pytest.mark.slow
@pytest.mark.parametrize("pool_type,class_token", [("map", False), ("gap", False), ("cls", True), ("none", False)])
def test_vit_pooling(pool_type, class_token):
  vit = ViT(variant="mu/8", depth=2, pool_type=pool_type, class_token=class_token, return_all_layers=True)
  x = jnp.zeros((2, 32, 32, 3))
  out, aux = vit.apply(vit.init(jax.random.key(0), x), x)
  tokens = 16 + int(class_token)
  assert aux["encoded"].shape == (2, tokens, 144)
  assert aux["hidden"].shape == (2, 2, tokens, 144)
  assert out.shape == ((2, tokens, 144) if pool_type == "none" else (2, 144))


def test_vit_errors_name_the_problem():
  with pytest.raises(ValueError, match="class_token"):
    ViT(variant="mu/8", pool_type="cls").init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="not divisible by patch size"):
    ViT(variant="mu/8").init(jax.random.key(0), jnp.zeros((1, 20, 16, 3)))
  with pytest.raises(ValueError, match="needs"):
    ViT(width=8).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_vit_sincos_and_learned_grid_check():
  vit = ViT(variant="mu/8", depth=1, posemb="sincos2d", pool_type="gap")
  x = jnp.zeros((1, 16, 16, 3))
  v = jax.jit(vit.init)(jax.random.key(0), x)
  assert "pos_embedding" not in v["params"]
  learned = ViT(variant="mu/8", depth=1, posemb_grid=(4, 4))
  with pytest.raises(ValueError, match="resample"):
    learned.init(jax.random.key(0), x)


def test_text_causal_masks_future_tokens():
  tx = TextTransformer(vocab_size=20, variant="mu", depth=2, causal=True, pool_type="first")
  a = jnp.array([[3, 4, 5, 6]])
  b = jnp.array([[3, 4, 9, 9]])
  v = jax.jit(tx.init)(jax.random.key(0), a)
  _, aux_a = tx.apply(v, a)
  _, aux_b = tx.apply(v, b)
  np.testing.assert_allclose(aux_a["encoded"][:, :2], aux_b["encoded"][:, :2], atol=1e-6)
  assert not np.allclose(aux_a["encoded"][:, 2:], aux_b["encoded"][:, 2:])


@pytest.mark.slow
def test_text_padding_mask_makes_padding_irrelevant():
  tx = TextTransformer(vocab_size=20, variant="mu", depth=2, pool_type="gap", padding_mask=True, pad_id=0)
  a = jnp.array([[3, 4, 5, 0, 0]])
  v = jax.jit(tx.init)(jax.random.key(0), a)
  z1, _ = tx.apply(v, a)
  z2, _ = tx.apply(v, a[:, :3])
  np.testing.assert_allclose(z1, z2, atol=1e-5)


def _two_tower(**kw):
  return build_model(
    "two_tower",
    dict(
      image=dict(variant="mu/8", depth=1, pool_type="map", out_dim=16),
      text=dict(variant="mu", depth=1, vocab_size=30, out_dim=16),
      **kw,
    ),
  )


@pytest.mark.slow
def test_two_tower_inits_and_normalised_embeddings():
  x, t = jnp.ones((2, 16, 16, 3)), jnp.ones((2, 8), jnp.int32)
  siglip = _two_tower()
  v = jax.jit(siglip.init)(jax.random.key(0), x, t)
  zimg, ztxt, out = siglip.apply(v, x, t)
  np.testing.assert_allclose(jnp.linalg.norm(zimg, axis=-1), 1, atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(ztxt, axis=-1), 1, atol=1e-5)
  np.testing.assert_allclose(out["scale"], 10.0, rtol=1e-6)  # SigLIP: t' = log 10
  np.testing.assert_allclose(out["bias"], -10.0)
  clip = _two_tower(temperature_init=CLIP_TEMPERATURE_INIT, bias_init=None, max_scale=100.0)
  v = jax.jit(clip.init)(jax.random.key(0), x, t)
  _, _, out = clip.apply(v, x, t)
  np.testing.assert_allclose(out["scale"], 1 / 0.07, rtol=1e-5)
  assert out["bias"] is None and "b" not in v["params"]
  v["params"]["t"] = v["params"]["t"].replace_boxed(jnp.array([math.log(500.0)]))
  _, _, out = clip.apply(v, x, t)
  np.testing.assert_allclose(out["scale"], 100.0)  # CLIP clamps the scale at 100


@pytest.mark.slow
def test_lit_frozen_tower_gets_no_gradient():
  x, t = jnp.ones((2, 16, 16, 3)), jnp.arange(16).reshape(2, 8) % 30
  lit = _two_tower(frozen=("image",))
  params = jax.tree.map(lambda p: p, jax.device_get(lit.init(jax.random.key(0), x, t)["params"]))
  params = __import__("flax").linen.meta.unbox(params)

  def loss(p):
    zimg, ztxt, _ = lit.apply({"params": p}, x, t)
    return jnp.sum(zimg @ ztxt.T)

  g = jax.grad(loss)(params)
  assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree.leaves(g["img"]))
  assert any(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(g["txt"]))
  with pytest.raises(ValueError, match="frozen"):
    _two_tower(frozen=("vision",)).init(jax.random.key(0), x, t)


@pytest.mark.slow
def test_bf16_compute_keeps_float32_params():
  x, t = jnp.ones((2, 16, 16, 3)), jnp.arange(16).reshape(2, 8) % 30
  m = build_model(
    "two_tower",
    dict(
      image=dict(variant="mu/8", depth=1, pool_type="map", out_dim=16, dtype="bfloat16"),
      text=dict(variant="mu", depth=1, vocab_size=30, out_dim=16, dtype="bfloat16"),
    ),
  )
  params = __import__("flax").linen.meta.unbox(m.init(jax.random.key(0), x, t)["params"])
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  _, aux = m.apply({"params": params}, x, method=m.encode_image)
  assert aux["encoded"].dtype == jnp.bfloat16
  zimg, ztxt, _ = m.apply({"params": params}, x, t)
  assert zimg.dtype == jnp.float32 and np.all(np.isfinite(zimg)) and np.all(np.isfinite(ztxt))
