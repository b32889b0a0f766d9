"""Building blocks: attention masks and GQA, norms, MLPs, position embeddings, poolers, scan/remat."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm.convert import stack_encoder_blocks
from vlm.nn import (
  Encoder,
  MAPHead,
  concat_adjacent_tokens,
  Mlp,
  MultiHeadAttention,
  make_attention_mask,
  pool,
  resample_posemb,
  sincos2d,
)
from vlm.nn.norms import make_norm


def _reference_attention(params, x, kv, mask, causal, n, k):
  q = jnp.einsum("btd,dnh->btnh", x, params["query"]["kernel"]) + params["query"]["bias"]
  kk = jnp.einsum("bsd,dkh->bskh", kv, params["key"]["kernel"]) + params["key"]["bias"]
  v = jnp.einsum("bsd,dkh->bskh", kv, params["value"]["kernel"]) + params["value"]["bias"]
  kk, v = jnp.repeat(kk, n // k, axis=2), jnp.repeat(v, n // k, axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(q.shape[-1])
  full = jnp.ones(logits.shape, bool)
  if mask is not None:
    full = full & mask
  if causal:
    full = full & jnp.tril(jnp.ones(logits.shape[-2:], bool))
  w = jax.nn.softmax(jnp.where(full, logits, -1e30), axis=-1)
  out = jnp.einsum("bnts,bsnh->btnh", w, v)
  return jnp.einsum("btnh,nhd->btd", out, params["out"]["kernel"]) + params["out"]["bias"]


@pytest.mark.slow
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_reference(num_kv_heads, causal):
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  valid = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  mask = make_attention_mask(None, valid)
  mha = MultiHeadAttention(num_heads=4, num_kv_heads=num_kv_heads)
  params = nn.meta.unbox(jax.jit(mha.init)(jax.random.key(1), x)["params"])
  got = mha.apply({"params": params}, x, mask=mask, causal=causal)
  want = _reference_attention(params, x, x, mask, causal, 4, num_kv_heads)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert params["key"]["kernel"].shape == (16, num_kv_heads, 4)


def test_cross_attention_and_padding_ignores_masked_keys():
  x = jax.random.normal(jax.random.key(0), (1, 3, 8))
  kv = jax.random.normal(jax.random.key(1), (1, 5, 12))
  mha = MultiHeadAttention(num_heads=2)
  params = jax.jit(mha.init)(jax.random.key(2), x, kv)
  mask = make_attention_mask(None, jnp.array([[1, 1, 1, 0, 0]], bool))
  out1 = mha.apply(params, x, kv, mask=mask)
  kv2 = kv.at[:, 3:].set(100.0)  # masked keys change: output must not
  np.testing.assert_allclose(out1, mha.apply(params, x, kv2, mask=mask), atol=1e-6)
  assert out1.shape == (1, 3, 8)


def test_qk_norm_params_and_invariance_to_key_scale():
  x = jax.random.normal(jax.random.key(0), (1, 4, 16))
  mha = MultiHeadAttention(num_heads=2, qk_norm="rms", use_bias=False)
  v = jax.jit(mha.init)(jax.random.key(1), x)
  assert {"query_norm", "key_norm"} <= set(v["params"])
  p = nn.meta.unbox(v["params"])
  p2 = jax.tree.map(lambda a: a, p)
  p2["key"]["kernel"] = p["key"]["kernel"] * 7.0  # RMS-normed keys: logits unchanged
  np.testing.assert_allclose(mha.apply({"params": p}, x), mha.apply({"params": p2}, x), atol=1e-4)


def test_norms():
  x = jax.random.normal(jax.random.key(0), (3, 8)) * 5 + 2
  ln = make_norm("layer", 1e-6)
  y = ln.apply(ln.init(jax.random.key(0), x), x)
  np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(y.std(-1), 1, atol=1e-3)
  rms = make_norm("rms", 1e-6)
  y = rms.apply(rms.init(jax.random.key(0), x), x)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(y**2, -1)), 1, atol=1e-3)
  with pytest.raises(ValueError, match="norm kind"):
    make_norm("batch")


@pytest.mark.parametrize("act,names", [("gelu", {"fc1", "fc2"}), ("swiglu", {"wi_0", "wi_1", "wo"})])
def test_mlp(act, names):
  x = jnp.ones((2, 5, 8))
  mlp = Mlp(32, act=act)
  v = jax.jit(mlp.init)(jax.random.key(0), x)
  assert set(v["params"]) == names
  assert mlp.apply(v, x).shape == (2, 5, 8)
  with pytest.raises(ValueError, match="unknown activation"):
    Mlp(4, act="gelux").init(jax.random.key(0), x)


def test_sincos2d_and_resample():
  pe = sincos2d(4, 4, 32)
  assert pe.shape == (1, 16, 32)
  # Row 0 col 1 differs from row 1 col 0: the two halves encode x and y.
  assert not np.allclose(pe[0, 1], pe[0, 4])
  grid = jnp.arange(16.0).reshape(1, 16, 1) * jnp.ones((1, 1, 3))
  up = resample_posemb(grid, (8, 8))
  assert up.shape == (1, 64, 3)
  same = resample_posemb(grid, (4, 4))
  np.testing.assert_array_equal(same, grid)
  # A linear ramp stays monotone along rows after bilinear resampling.
  assert np.all(np.diff(np.asarray(up[0, :8, 0])) >= 0)
  with pytest.raises(ValueError, match="square"):
    resample_posemb(jnp.zeros((1, 15, 3)), (4, 4))


@pytest.mark.slow
def test_poolers():
  x = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  tokens = jnp.array([[5, 9, 2, 0], [5, 7, 8, 2]])
  np.testing.assert_array_equal(pool(x, "first"), x[:, 0])
  np.testing.assert_array_equal(pool(x, "last"), x[:, -1])
  np.testing.assert_array_equal(pool(x, "eos", tokens=tokens, eos_id=2), jnp.stack([x[0, 2], x[1, 3]]))
  np.testing.assert_array_equal(pool(x, "argmax", tokens=tokens), jnp.stack([x[0, 1], x[1, 2]]))
  valid = tokens != 0
  np.testing.assert_allclose(pool(x, "gap", mask=valid)[0], x[0, :3].mean(0))
  head = MAPHead(num_heads=1, mlp_dim=8)
  v = jax.jit(head.init)(jax.random.key(0), x)
  assert head.apply(v, x).shape == (2, 3)
  multi = MAPHead(num_heads=1, mlp_dim=8, num_queries=5)
  assert multi.apply(multi.init(jax.random.key(0), x), x).shape == (2, 5, 3)
  with pytest.raises(ValueError, match="unknown pool_type"):
    pool(x, "max")


def test_concat_adjacent_tokens_merges_groups_in_order():
  x = np.arange(2 * 8 * 3, dtype=np.float32).reshape(2, 8, 3)
  out = np.asarray(concat_adjacent_tokens(jnp.asarray(x), 4))
  assert out.shape == (2, 2, 12)
  np.testing.assert_array_equal(out[1, 1], np.concatenate(x[1, 4:8]))  # tokens 4..7 side by side
  np.testing.assert_array_equal(np.asarray(concat_adjacent_tokens(jnp.asarray(x), 1)), x)
  with pytest.raises(ValueError, match="8 tokens are not divisible into groups of 3"):
    concat_adjacent_tokens(jnp.asarray(x), 3)


@pytest.mark.slow
def test_scan_equals_loop_and_remat_equals_plain():
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  kw = dict(depth=3, num_heads=2, mlp_dim=32)
  loop = Encoder(**kw)
  p_loop = nn.meta.unbox(jax.jit(loop.init)(jax.random.key(1), x)["params"])
  p_scan = stack_encoder_blocks({"encoder": jax.tree.map(np.asarray, p_loop)})["encoder"]
  scan = Encoder(**kw, scan=True)
  want = loop.apply({"params": p_loop}, x)
  np.testing.assert_allclose(scan.apply({"params": p_scan}, x), want, atol=1e-5)
  remat = Encoder(**kw, remat_policy="full")

  def loss(m, p):
    return jnp.sum(m.apply({"params": p}, x) ** 2)

  g1 = jax.grad(lambda p: loss(loop, p))(p_loop)
  g2 = jax.grad(lambda p: loss(remat, p))(p_loop)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), g1, g2)
  with pytest.raises(ValueError, match="remat_policy"):
    Encoder(**kw, remat_policy="some").init(jax.random.key(0), x)


def test_dropout_and_droppath_only_in_training():
  x = jnp.ones((8, 4, 16))
  enc = Encoder(depth=2, num_heads=2, mlp_dim=32, dropout=0.1, droppath=0.5)
  v = jax.jit(enc.init)(jax.random.key(0), x)
  det1 = enc.apply(v, x)
  np.testing.assert_array_equal(det1, enc.apply(v, x))
  tr = enc.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(tr, det1)


def test_every_parameter_has_logical_names():
  from vlm.models import build_model

  m = build_model(
    "two_tower",
    dict(
      image=dict(variant="mu/8", pool_type="map", out_dim=16, class_token=True),
      text=dict(variant="mu", vocab_size=50, out_dim=16, pool_type="map", scan=True),
    ),
  )
  v = jax.jit(m.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 8), jnp.int32))
  leaves = jax.tree.leaves(v["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim


# -- attention implementation (config.attention_impl) ---------------------------------------------


def test_attention_implementation_is_scoped_and_checked():
  from vlm.nn.attention import attention_implementation, current_attention_implementation, resolve_implementation

  q = jnp.zeros((1, 4, 2, 16), jnp.bfloat16)
  assert current_attention_implementation() == "auto"
  assert resolve_implementation(q, q, None) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
  with attention_implementation("xla"):
    assert resolve_implementation(q, q, None) == "xla"
    with attention_implementation("cudnn"):
      assert resolve_implementation(q, q, None) == "cudnn"
    assert current_attention_implementation() == "xla"
  assert current_attention_implementation() == "auto"
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    with attention_implementation("flash"):
      pass


def test_cudnn_is_chosen_only_where_it_runs(monkeypatch):
  from vlm.nn import attention

  monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
  bf = lambda t, hd=64: jnp.zeros((1, t, 2, hd), jnp.bfloat16)  # noqa: E731
  assert attention.cudnn_supported(bf(8), bf(8), None)
  assert attention.cudnn_supported(bf(8), bf(6), jnp.ones((1, 1, 8, 6), bool))
  assert not attention.cudnn_supported(bf(7), bf(8), jnp.ones((1, 1, 7, 8), bool))  # odd T with a mask
  assert attention.cudnn_supported(bf(7), bf(9), None)
  assert not attention.cudnn_supported(bf(8, 60), bf(8, 60), None)  # head dim not a multiple of 8
  assert not attention.cudnn_supported(bf(8, 192), bf(8, 192), None)
  f32 = jnp.zeros((1, 8, 2, 64), jnp.float32)
  assert not attention.cudnn_supported(f32, f32, None)
  monkeypatch.setattr(attention.jax, "default_backend", lambda: "cpu")
  assert not attention.cudnn_supported(bf(8), bf(8), None)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize(
  "causal,masked,kv_heads", [(False, False, 4), (True, False, 4), (False, True, 4), (True, True, 2), (False, False, 1)]
)
def test_cudnn_attention_matches_xla(causal, masked, kv_heads):
  from vlm.nn.attention import attention_implementation

  m = MultiHeadAttention(num_heads=4, num_kv_heads=kv_heads, head_dim=64, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (2, 128, 256))
  mask = None
  if masked:  # padding: row 1 has 100 real keys
    valid = jnp.arange(128)[None, :] < jnp.array([[128], [100]])
    mask = make_attention_mask(None, valid)
  params = jax.jit(m.init)(jax.random.key(1), x)["params"]
  outs = {}
  for impl in ("xla", "cudnn"):
    with attention_implementation(impl):  # a fresh jit per implementation: it is read while tracing
      fn = jax.jit(lambda p, x: m.apply({"params": p}, x, mask=mask, causal=causal))
      outs[impl] = np.asarray(fn(params, x), np.float32)
      grad = jax.jit(
        jax.grad(lambda p, x: m.apply({"params": p}, x, mask=mask, causal=causal).astype(jnp.float32).sum())
      )
      outs[impl + "_grad"] = np.asarray(grad(params, x)["query"]["kernel"], np.float32)
  np.testing.assert_allclose(outs["cudnn"], outs["xla"], atol=2e-2, rtol=2e-2)  # bf16 tolerances
  np.testing.assert_allclose(outs["cudnn_grad"], outs["xla_grad"], atol=5e-2, rtol=5e-2)
