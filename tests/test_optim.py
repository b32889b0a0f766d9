"""Optimiser construction: schedules, clipping, weight-decay masks, freezing, lr multipliers."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vlm.optim import build_optimizer, make_schedule


def _cfg(**kw):
  base = dict(lr=0.1, wd=0.0, optimizer="sgd", optimizer_kw=dict(momentum=0.0), schedule=dict(name="constant"))
  base.update(kw)
  return ml_collections.ConfigDict(base)


PARAMS = {
  "img": {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}},
  "txt": {"dense": {"kernel": jnp.ones((2, 2))}},
  "t": jnp.ones(1),
}


def _update(cfg, grads=None):
  tx, _ = build_optimizer(cfg, total_steps=100)
  state = tx.init(PARAMS)
  grads = grads or jax.tree.map(jnp.ones_like, PARAMS)
  updates, state = tx.update(grads, state, PARAMS)
  return updates, state


def test_schedules():
  s = make_schedule(1.0, 100, "warmup_cosine", warmup_steps=10)
  assert float(s(0)) == 0.0 and np.isclose(float(s(10)), 1.0) and float(s(100)) < 1e-6
  r = make_schedule(1.0, 100, "warmup_rsqrt", warmup_steps=10, timescale=10, cooldown_steps=20)
  assert np.isclose(float(r(10)), 1.0) and np.isclose(float(r(20)), np.sqrt(0.5), atol=1e-6)
  assert float(r(100)) == 0.0  # cooled down to zero
  lin = make_schedule(1.0, 110, "warmup_linear", warmup_steps=10, end_lr_frac=0.1)
  assert np.isclose(float(lin(10)), 1.0) and np.isclose(float(lin(60)), 0.55) and np.isclose(float(lin(110)), 0.1)
  with pytest.raises(ValueError, match="schedule"):
    make_schedule(1.0, 10, "linear")


def test_sgd_frozen_and_lr_mults():
  updates, state = _update(_cfg(frozen=["img/.*"], lr_mults=[["txt/.*", 0.5]]))
  np.testing.assert_array_equal(updates["img"]["dense"]["kernel"], 0.0)
  np.testing.assert_allclose(updates["txt"]["dense"]["kernel"], -0.05)
  np.testing.assert_allclose(updates["t"], -0.1)
  # Frozen parameters hold no optimiser state.
  leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  assert any(isinstance(x, optax.MaskedNode) for x in leaves)


def test_weight_decay_mask_skips_biases_and_scalars():
  zero = jax.tree.map(jnp.zeros_like, PARAMS)
  updates, _ = _update(_cfg(wd=0.5), grads=zero)
  np.testing.assert_allclose(updates["img"]["dense"]["kernel"], -0.05)  # lr * wd * param
  np.testing.assert_array_equal(updates["img"]["dense"]["bias"], 0.0)
  np.testing.assert_array_equal(updates["t"], 0.0)


def test_clipping_and_other_optimizers():
  big = jax.tree.map(lambda p: 100 * jnp.ones_like(p), PARAMS)
  updates, _ = _update(_cfg(grad_clip_norm=1.0), grads=big)
  assert np.isclose(float(optax.global_norm(updates)), 0.1, rtol=1e-5)
  for name in ("adamw", "adafactor"):
    updates, _ = _update(_cfg(optimizer=name, optimizer_kw={}))
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_adafactor_momentum_averages_updates():
  """CoCa's Adafactor with beta1: the second update mixes the first (0.9) with the new one (0.1)."""
  cfg = _cfg(optimizer="adafactor", optimizer_kw=dict(b1=0.9), lr=1.0)
  tx, _ = build_optimizer(cfg, total_steps=100)
  plain, _ = build_optimizer(_cfg(optimizer="adafactor", optimizer_kw={}, lr=1.0), total_steps=100)
  g1 = jax.tree.map(jnp.ones_like, PARAMS)
  g2 = jax.tree.map(lambda p: -jnp.ones_like(p), PARAMS)
  state, pstate = tx.init(PARAMS), plain.init(PARAMS)
  u1, state = tx.update(g1, state, PARAMS)
  p1, pstate = plain.update(g1, pstate, PARAMS)
  u2, state = tx.update(g2, state, PARAMS)
  p2, pstate = plain.update(g2, pstate, PARAMS)
  np.testing.assert_allclose(u1["t"], 0.1 * p1["t"], rtol=1e-5)
  np.testing.assert_allclose(u2["t"], 0.9 * u1["t"] + 0.1 * p2["t"], rtol=1e-5)


def test_errors_name_the_key():
  with pytest.raises(ValueError, match="config.optimizer"):
    _update(_cfg(optimizer="lamb"))
  with pytest.raises(ValueError, match="config.frozen"):
    _update(_cfg(frozen=["img/(("]))
