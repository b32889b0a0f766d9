"""Mesh construction, sharded initialisation, and a sharded train step equal to one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import PartitionSpec as P

from vlm import parallel
from vlm.models import build_model
from vlm.objectives import build_objective
from vlm.train_step import create_train_state, make_train_step

MODEL = dict(
    image=dict(variant="mu/8", width=32, depth=2, mlp_dim=64, num_heads=4, pool_type="map", out_dim=16),
    text=dict(variant="mu", width=32, depth=2, mlp_dim=64, num_heads=4, vocab_size=40, out_dim=16,
              pool_type="last"),
)


def test_make_mesh():
  mesh = parallel.make_mesh([("data", -1), ("fsdp", 2), ("tensor", 1)])
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert parallel.data_axes(mesh) == ("data", "fsdp")
  with pytest.raises(ValueError, match="needs 16 devices"):
    parallel.make_mesh([("data", 8), ("fsdp", 2)])
  with pytest.raises(ValueError, match="at most one"):
    parallel.make_mesh([("data", -1), ("fsdp", -1)])


def test_params_are_initialised_into_their_shardings():
  mesh = parallel.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  model = build_model("two_tower", MODEL)
  x, t = jnp.zeros((2, 16, 16, 3)), jnp.zeros((2, 8), jnp.int32)
  params, shardings = parallel.init_sharded(
      lambda rng: model.init(rng, x, t)["params"], mesh, parallel.DEFAULT_RULES, jax.random.key(0))
  q = params["img"]["encoder"]["block_0"]["attn"]["query"]["kernel"]  # ('embed', 'heads', 'kv')
  assert q.sharding.spec == P("fsdp", "tensor", None)
  fc1 = params["txt"]["encoder"]["block_1"]["mlp"]["fc1"]["kernel"]  # ('embed', 'mlp')
  assert fc1.sharding.spec == P("fsdp", "tensor")
  # Each device holds a quarter of the kernel.
  assert q.addressable_shards[0].data.shape == (16, 2, 8)
  # vocab 40 is not divisible by tensor=2? it is; the posemb grid dim (1) is not sharded.
  emb = params["txt"]["embedding"]["embedding"]
  assert emb.sharding.spec == P("tensor", "fsdp")


def test_uneven_dims_stay_replicated():
  mesh = parallel.make_mesh([("data", 1), ("fsdp", 8)])
  spec = parallel._fit_spec(P("fsdp", None), (12, 4), mesh)
  assert spec == P(None, None)
  assert parallel._fit_spec(P(("data", "fsdp")), (16,), mesh) == P(("data", "fsdp"))


def _one_step(mesh, batch, impl):
  model = build_model("two_tower", MODEL)
  objective = build_objective("contrastive", dict(loss="sigmoid", impl=impl), mesh=mesh)
  tx = optax.adamw(1e-2, weight_decay=1e-4)
  init_args = (jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 8), jnp.int32))
  state, shardings = create_train_state(model, tx, mesh, parallel.DEFAULT_RULES, init_args, seed=0)
  step = make_train_step(model, objective, tx, mesh, parallel.DEFAULT_RULES, shardings)
  state, metrics = step(state, parallel.shard_batch(batch, mesh))
  state, metrics2 = step(state, parallel.shard_batch(batch, mesh))
  return jax.device_get(state.params), float(metrics["loss"]), float(metrics2["loss"]), state


@pytest.mark.parametrize("impl", ["all_gather", "ring"])
def test_sharded_step_equals_single_device(impl):
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
           "text": rng.integers(1, 40, size=(16, 8)).astype(np.int32)}
  one = parallel.make_mesh([("data", 1), ("fsdp", 1)], devices=jax.devices()[:1])
  eight = parallel.make_mesh([("data", 4), ("fsdp", 2)])
  p1, l1a, l1b, _ = _one_step(one, batch, impl)
  p8, l8a, l8b, state8 = _one_step(eight, batch, impl)
  np.testing.assert_allclose(l8a, l1a, rtol=1e-5)
  np.testing.assert_allclose(l8b, l1b, rtol=1e-5)
  # Attention key biases get an exactly-zero gradient in exact arithmetic (softmax is invariant to
  # q.b_k); Adam normalises their rounding noise to +-lr, so they are not comparable.
  flat8, flat1 = flatten_dict(p8, sep="/"), flatten_dict(p1, sep="/")
  assert flat8.keys() == flat1.keys()
  for k in flat1:
    if not k.endswith("key/bias"):
      np.testing.assert_allclose(flat8[k], flat1[k], atol=2e-5, err_msg=k)
  # The 8-device state really is sharded over fsdp.
  k = state8.params["img"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
  assert k.sharding.spec[0] == "fsdp" and len(k.sharding.device_set) == 8
