"""Mesh construction, sharded initialisation, and a sharded train step equal to one device."""

import sys

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
  text=dict(variant="mu", width=32, depth=2, mlp_dim=64, num_heads=4, vocab_size=40, out_dim=16, pool_type="last"),
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
    lambda rng: model.init(rng, x, t)["params"], mesh, parallel.DEFAULT_RULES, jax.random.key(0)
  )
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


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["all_gather", "ring"])
def test_sharded_step_equals_single_device(impl):
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
    "text": rng.integers(1, 40, size=(16, 8)).astype(np.int32),
  }
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


# ------------------------------------------- abstract state and compile at scale --


def _compile_at_scale():
  """experiments/benchmarks/compile_at_scale.py as a module (imported, JAX keeps its 8 devices)."""
  import importlib.util
  from pathlib import Path

  path = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "compile_at_scale.py"
  spec = importlib.util.spec_from_file_location("compile_at_scale", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses look their module up
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_abstract_train_state_matches_create_train_state_and_compiles_the_real_step():
  """abstract_train_state = create_train_state without arrays (shapes, dtypes, shardings, also of a
  frozen subtree's MaskedNodes and Adafactor's factored statistics), and the step compiled on it runs
  the real state and batch."""
  from vlm.train_step import abstract_train_state

  mesh = parallel.make_mesh([("data", 2), ("fsdp", 4)])
  model = build_model("two_tower", MODEL)
  objective = build_objective("contrastive", dict(loss="sigmoid", impl="ring"), mesh=mesh)
  train = optax.chain(optax.scale_by_factored_rms(min_dim_size_to_factor=16), optax.ema(0.9), optax.scale(-1e-3))
  tx = optax.multi_transform(
    {"train": train, "frozen": optax.set_to_zero()},
    lambda params: {k: "frozen" if k == "img" else "train" for k in params},
  )
  rng = np.random.default_rng(0)
  batch = parallel.shard_batch(
    {
      "image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
      "text": rng.integers(1, 40, size=(16, 8)).astype(np.int32),
    },
    mesh,
  )
  abstract_batch = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for k, x in batch.items()}
  abstract, abstract_shardings = abstract_train_state(
    model, tx, mesh, parallel.DEFAULT_RULES, jax.eval_shape(objective.init_args, abstract_batch)
  )
  state, shardings = create_train_state(model, tx, mesh, parallel.DEFAULT_RULES, objective.init_args(batch))
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  assert jax.tree.structure(abstract_shardings) == jax.tree.structure(shardings)
  for a, x, s, s2 in zip(
    jax.tree.leaves(abstract), jax.tree.leaves(state), jax.tree.leaves(shardings), jax.tree.leaves(abstract_shardings)
  ):
    assert isinstance(a, jax.ShapeDtypeStruct)
    assert (a.shape, a.dtype) == (x.shape, x.dtype)
    assert a.sharding == s2 == s
    assert x.sharding.is_equivalent_to(s, x.ndim)
  # The optimiser state follows its parameters' shardings (it is not replicated); the factored row /
  # column statistics (other shapes) are replicated; the frozen tower has no optimiser state.
  flat = {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}
  kernel = "['txt']['encoder']['block_0']['mlp']['fc1']['kernel']"  # [32, 64] ('embed', 'mlp')
  copies = [x for path, x in flat.items() if path.endswith(kernel)]
  assert sorted(x.shape for x in copies) == [(1,), (32,), (32, 64), (64,)]  # v placeholder, v_row, ema, v_col
  for x in copies:
    assert x.sharding.spec == (P("fsdp", None) if x.ndim == 2 else P()), x.shape
  assert not any("['img']" in path for path in flat)
  # The step compiled on abstract inputs is the real one: it runs on the arrays.
  step = make_train_step(model, objective, tx, mesh, parallel.DEFAULT_RULES, abstract_shardings)
  assert isinstance(step.lower(abstract, abstract_batch), jax.stages.Lowered)
  compiled = step.compiled(abstract, abstract_batch)
  assert compiled.memory_analysis().temp_size_in_bytes > 0 and step.flops(abstract, abstract_batch) > 0
  new_state, metrics = compiled(state, batch)
  assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 1


def test_compile_at_scale_on_a_tiny_recipe(data_dir):
  """The benchmark's machinery on the SigLIP demo (tiny towers, batch 16, fsdp over 8 devices): positive
  per-device bytes and FLOPs; its abstract batch has the real pipeline's keys, shapes and dtypes."""
  cas = _compile_at_scale()
  tiny = (
    ("batch_size", 16),
    ("mesh", [("data", 2), ("fsdp", 4)]),
    ("model.image.depth", 1),
    ("model.text.depth", 1),
    ("model.image.width", 32),
    ("model.text.width", 32),
    ("model.text.out_dim", 32),
  )
  config = cas.build_config(cas.Recipe("configs/siglip_b16.py:demo", tiny))
  row = cas.compile_config(config, "tiny")
  assert row["devices"] == 8 and row["mesh"] == {"data": 2, "fsdp": 4}
  for key in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes", "flops_per_device"):
    assert row[key] > 0, key
  assert row["fits_80gb"] and row["flops_per_step"] == 8 * row["flops_per_device"]
  assert "| tiny | data 2 x fsdp 4 | 16 |" in cas.markdown_rows([row])

  from conftest import TINY_DATA
  from vlm.data import make_pipeline

  for spec in ("configs/siglip_b16.py:demo", "configs/blip2_stage2.py:demo"):  # + tokens, loss_mask, instruction
    config = cas.load_config(spec)
    config.data.data_dir = str(data_dir)
    config.data.builder.update(TINY_DATA)
    mesh = parallel.make_mesh([("data", -1)])
    real = next(make_pipeline(config.data, split="train", batch_size=16, mesh=mesh, seed=0))
    abstract = cas.abstract_batch(config, mesh, 16)
    assert set(abstract) <= set(real), spec
    for k, a in abstract.items():
      assert (a.shape, a.dtype, a.sharding) == (real[k].shape, real[k].dtype, real[k].sharding), (spec, k)


def test_ring_loss_needs_less_temp_memory_than_all_gather():
  cas = _compile_at_scale()
  mesh = parallel.make_mesh([("data", -1)])
  # Per device: all-gather holds [256, 2048] logits (2 MiB) and the gathered [2048, 64] texts; the ring
  # only [256, 256] blocks (256 KiB) and the [256, 64] travelling block.
  ag, ring = (cas.compile_loss(mesh, impl, "sigmoid", batch=2048, dim=64) for impl in ("all_gather", "ring"))
  assert 0 < ring["temp_bytes"] < ag["temp_bytes"] / 2
  assert ag["temp_bytes"] > 2048 * 256 * 4
