"""Contrastive losses: sharded implementations equal the single-device reference."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vlm.losses import (
  LOSSES,
  all_gather_batch,
  contrastive_loss,
  get_loss_fn,
  pairwise_contrastive_loss,
  sigmoid_loss,
  softmax_loss,
)

TOL = dict(rtol=1e-5, atol=1e-5)
MESHES = {
  "data8": ((8,), ("data",)),
  "data4_fsdp2": ((4, 2), ("data", "fsdp")),
  "data2_fsdp2_tensor2": ((2, 2, 2), ("data", "fsdp", "tensor")),
  "data1_tensor8": ((1, 8), ("data", "tensor")),  # ring of one device
}
# Global batches: 8 and 32, plus one with local batch 1 on the (2, 2, 2) mesh.
CASES = [(m, bsz) for m in list(MESHES)[:3] for bsz in (8, 32)] + [("data2_fsdp2_tensor2", 4), ("data1_tensor8", 8)]
PARAMS = {"sigmoid": (10.0, -10.0), "softmax": (1 / 0.07, 0.3)}


@functools.lru_cache(maxsize=None)
def make_mesh(name: str) -> jax.sharding.Mesh:
  shape, names = MESHES[name]
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def embeddings(batch: int, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Unit-norm float32 [B, D] pairs; texts correlated with images (loss O(1))."""
  rng = np.random.default_rng(seed)
  zimg = rng.normal(size=(batch, dim))
  ztxt = zimg + 0.8 * rng.normal(size=(batch, dim))
  norm = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  return norm(zimg), norm(ztxt)


def value_and_grads(kind, impl, mesh, zimg, ztxt, scale, bias):
  """((loss, metrics), grads w.r.t. zimg, ztxt, scale[, bias]) under jit."""
  f = lambda *a: contrastive_loss(*a, kind=kind, impl=impl, mesh=mesh)
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  return jax.jit(jax.value_and_grad(f, argnums=argnums, has_aux=True))(zimg, ztxt, scale, bias)


@functools.lru_cache(maxsize=None)
def reference(kind: str, batch: int, with_bias: bool):
  scale, bias = (np.float32(v) for v in PARAMS[kind])
  return value_and_grads(kind, "local", None, *embeddings(batch), scale, bias if with_bias else None)


def assert_tree_close(a, b) -> None:
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **TOL), a, b)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["all_gather", "ring"])
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("mesh_name,batch", CASES)
def test_sharded_matches_reference(kind, impl, mesh_name, batch):
  mesh = make_mesh(mesh_name)
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  sharding = NamedSharding(mesh, P(axes, None))
  zimg, ztxt = (jax.device_put(x, sharding) for x in embeddings(batch))
  scale, bias = (np.float32(v) for v in PARAMS[kind])
  (loss, metrics), grads = value_and_grads(kind, impl, mesh, zimg, ztxt, scale, bias)
  (ref, ref_metrics), ref_grads = reference(kind, batch, True)
  np.testing.assert_allclose(loss, ref, **TOL)
  assert_tree_close(grads, ref_grads)
  assert_tree_close(metrics, ref_metrics)


@pytest.mark.parametrize("impl", ["all_gather", "ring"])
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_sharded_without_bias(kind, impl):
  """CLIP has no bias: bias=None, gradients w.r.t. zimg, ztxt, scale."""
  mesh = make_mesh("data4_fsdp2")
  zimg, ztxt = embeddings(16)
  scale = np.float32(PARAMS[kind][0])
  (loss, metrics), grads = value_and_grads(kind, impl, mesh, zimg, ztxt, scale, None)
  (ref, ref_metrics), ref_grads = reference(kind, 16, False)
  np.testing.assert_allclose(loss, ref, **TOL)
  assert_tree_close(grads, ref_grads)
  assert_tree_close(metrics, ref_metrics)


def numpy_losses(zimg, ztxt, scale, bias):
  """Direct float64 formulas of SigLIP and CLIP."""
  zimg, ztxt = np.asarray(zimg, np.float64), np.asarray(ztxt, np.float64)
  logits = scale * zimg @ ztxt.T + bias
  n = len(zimg)
  labels = 2 * np.eye(n) - 1
  sig = np.sum(np.log1p(np.exp(-labels * logits))) / n
  ce_rows = [-np.log(np.exp(logits[i, i]) / np.exp(logits[i]).sum()) for i in range(n)]
  ce_cols = [-np.log(np.exp(logits[j, j]) / np.exp(logits[:, j]).sum()) for j in range(n)]
  return sig, 0.5 * (np.mean(ce_rows) + np.mean(ce_cols))


@pytest.mark.parametrize("batch", [1, 16])
def test_reference_matches_numpy(batch):
  zimg, ztxt = embeddings(batch, seed=batch)
  sig, soft = numpy_losses(zimg, ztxt, 10.0, -10.0)
  _, soft_nobias = numpy_losses(zimg, ztxt, 10.0, 0.0)

  @jax.jit
  def losses(zimg, ztxt):
    return (
      sigmoid_loss(zimg, ztxt, 10.0, -10.0),
      softmax_loss(zimg, ztxt, 10.0, -10.0),
      softmax_loss(zimg, ztxt, 10.0),
      contrastive_loss(zimg, ztxt, 10.0, -10.0, impl="local")[1],
    )

  got_sig, got_soft, got_soft_nobias, metrics = losses(zimg, ztxt)
  np.testing.assert_allclose(got_sig, sig, **TOL)
  np.testing.assert_allclose(got_soft, soft, **TOL)
  np.testing.assert_allclose(got_soft_nobias, soft_nobias, **TOL)
  # Metrics: mean diagonal and mean off-diagonal logit.
  logits = 10.0 * np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T - 10.0
  np.testing.assert_allclose(metrics["pos_logit"], np.mean(np.diag(logits)), **TOL)
  if batch > 1:
    neg = logits[~np.eye(batch, dtype=bool)].mean()
    np.testing.assert_allclose(metrics["neg_logit"], neg, **TOL)


def _inner_shapes(jaxpr, inside: bool = False):
  """Yields shapes of all variables defined inside shard_map bodies, recursively."""
  for eqn in jaxpr.eqns:
    if inside:
      for v in eqn.outvars:
        yield tuple(getattr(v.aval, "shape", ()))
    sub_inside = inside or eqn.primitive.name == "shard_map"
    for param in eqn.params.values():
      for p in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(p, "jaxpr", p)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          if sub_inside:
            yield from (tuple(v.aval.shape) for v in sub.invars)
          yield from _inner_shapes(sub, sub_inside)


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_ring_has_no_global_batch_intermediates(kind):
  """Forward + backward of the ring version only hold [b, b] / [b, D] blocks."""
  b, n, dim = 4, 8, 12
  big_b = b * n  # 32: distinct from b, dim, b * b, n
  mesh = make_mesh("data8")
  zimg, ztxt = embeddings(big_b, dim)

  def shapes(impl):
    f = lambda zi, zt, s, bi: contrastive_loss(zi, zt, s, bi, kind=kind, impl=impl, mesh=mesh)[0]
    closed = jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2, 3)))(zimg, ztxt, 10.0, -1.0)
    return list(_inner_shapes(closed.jaxpr))

  ring, gathered = shapes("ring"), shapes("all_gather")
  assert (b, b) in ring and any(s and s[0] == b for s in ring)
  assert [s for s in ring if big_b in s] == []
  # The check has teeth: the all-gather version holds [b, B] logits.
  assert (b, big_b) in gathered


def test_ring_compiled_memory_is_smaller():
  """XLA's own accounting: ring temporaries are far below the [b, B] of all-gather."""
  mesh = make_mesh("data8")
  zimg, ztxt = embeddings(8 * 256, 32)

  def temp_bytes(kind, impl):
    f = lambda zi, zt, s, bi: contrastive_loss(zi, zt, s, bi, kind=kind, impl=impl, mesh=mesh)[0]
    grad = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))
    stats = grad.lower(zimg, ztxt, 10.0, -1.0).compile().memory_analysis()
    if stats is None:
      pytest.skip("no memory analysis on this backend")
    return stats.temp_size_in_bytes

  for kind in ("sigmoid", "softmax"):
    # [b, B] float32 logits alone are 2 MiB per device; [b, b] blocks 256 KiB.
    assert temp_bytes(kind, "ring") * 4 < temp_bytes(kind, "all_gather")


def test_registry_and_errors():
  assert set(LOSSES) == {(k, i) for k in ("sigmoid", "softmax") for i in ("all_gather", "ring", "local")}
  with pytest.raises(ValueError, match="sigmoid"):
    get_loss_fn("triplet", "ring")
  with pytest.raises(ValueError, match="all_gather"):
    contrastive_loss(*embeddings(8), 1.0, kind="softmax", impl="ppermute")
  with pytest.raises(ValueError, match="divisible"):
    contrastive_loss(*embeddings(6), 1.0, mesh=make_mesh("data8"))


def test_eager_without_jit_and_all_gather_batch():
  mesh = make_mesh("data4_fsdp2")
  zimg, ztxt = embeddings(8)
  scale, bias = PARAMS["sigmoid"]
  loss, _ = contrastive_loss(zimg, ztxt, scale, bias, kind="sigmoid", impl="ring", mesh=mesh)
  np.testing.assert_allclose(loss, reference("sigmoid", 8, True)[0][0], **TOL)
  # Each of the 8 devices holds the whole batch (stacked here along axis 0).
  axes = ("data", "fsdp")
  gathered = jax.shard_map(lambda x: all_gather_batch(x, axes), mesh=mesh, in_specs=P(axes), out_specs=P(axes))(zimg)
  np.testing.assert_array_equal(gathered, np.tile(zimg, (8, 1)))


# ------------------------------------------------ pairwise similarities --


def _dot(img, txt):
  return img["z"] @ txt["z"].T


def _llip_sides(batch: int, seed: int = 0, k: int = 3, heads: int = 2, dh: int = 4):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  img = {"keys": f(batch, k, heads, dh), "values": f(batch, k, heads, dh)}
  txt = {"query": f(batch, heads, dh), "z": f(batch, heads * dh)}
  return img, txt


def _pairwise(kind, impl, mesh, img, txt, sim_fn, scale=10.0, bias=-3.0):
  f = lambda i, t, s, b: pairwise_contrastive_loss(i, t, sim_fn, s, b, kind=kind, impl=impl, mesh=mesh)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(
    img, txt, np.float32(scale), np.float32(bias)
  )


@pytest.mark.parametrize(
  "kind,impl", [("sigmoid", "all_gather"), ("sigmoid", "ring"), ("softmax", "all_gather"), ("sigmoid", "local")]
)
@pytest.mark.parametrize("mesh_name", ["data8", "data2_fsdp2_tensor2"])
def test_pairwise_with_dot_products_is_the_contrastive_loss(kind, impl, mesh_name):
  """The generic pair-similarity path, given sim = <zimg, ztxt>, equals the dot-product losses."""
  mesh = make_mesh(mesh_name)
  zimg, ztxt = embeddings(16)
  (loss, metrics), grads = _pairwise(kind, impl, mesh, {"z": zimg}, {"z": ztxt}, _dot)
  (ref, ref_metrics), ref_grads = value_and_grads(kind, impl, mesh, zimg, ztxt, np.float32(10.0), np.float32(-3.0))
  np.testing.assert_allclose(loss, ref, **TOL)
  assert_tree_close(metrics, ref_metrics)
  assert_tree_close((grads[0]["z"], grads[1]["z"], grads[2], grads[3]), ref_grads)


@pytest.mark.parametrize("kind,impl", [("sigmoid", "all_gather"), ("sigmoid", "ring"), ("softmax", "all_gather")])
def test_pairwise_llip_sharded_matches_one_device(kind, impl):
  """Llip's caption-conditioned similarity: the ring (text queries travel) and all-gather
  versions give the single-device loss and gradients for every leaf of both sides."""
  from vlm.models.llip import llip_similarity

  sim = functools.partial(llip_similarity, temperature=5.0)
  img, txt = _llip_sides(16)
  ref = _pairwise(kind, "local", None, img, txt, sim)
  got = _pairwise(kind, impl, make_mesh("data4_fsdp2"), img, txt, sim)
  assert_tree_close(got, ref)
  # The loss depends on the queries: the check sees them.
  assert np.abs(ref[1][1]["query"]).max() > 1e-4


def test_pairwise_errors():
  img, txt = _llip_sides(8)
  with pytest.raises(ValueError, match="not implemented"):
    pairwise_contrastive_loss(img, txt, _dot, 1.0, kind="softmax", impl="ring", mesh=make_mesh("data8"))
  with pytest.raises(ValueError, match="divisible"):
    pairwise_contrastive_loss(*_llip_sides(6), _dot, 1.0, mesh=make_mesh("data8"))


def test_pairwise_ring_has_no_global_batch_intermediates():
  """Llip on the ring: forward + backward hold [b, b] pair blocks, never [b, B]."""
  from vlm.models.llip import llip_similarity

  b, n = 4, 8
  big_b = b * n  # 32: distinct from every other dimension below
  img, txt = _llip_sides(big_b, k=3, heads=2, dh=5)
  sim = functools.partial(llip_similarity, temperature=5.0)

  def shapes(impl):
    f = lambda i, t: pairwise_contrastive_loss(i, t, sim, 10.0, -1.0, impl=impl, mesh=make_mesh("data8"))[0]
    return list(_inner_shapes(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(img, txt).jaxpr))

  ring, gathered = shapes("ring"), shapes("all_gather")
  assert (b, b) in ring
  assert [s for s in ring if big_b in s] == []
  assert (b, big_b) in gathered
