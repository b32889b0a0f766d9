"""Flamingo: PerceiverResampler, GatedCrossAttentionBlock and media masks (vlm.nn.perceiver), the Flamingo
model (vlm.models.flamingo), and the IDEFICS importers (vlm.convert.idefics) against small random
transformers IDEFICS modules."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vlm.models.decoder import DecoderLM
from vlm.models import predict_fns
from vlm.models.flamingo import Flamingo
from vlm.models.generation import init_cache, step_fn
from vlm.nn.perceiver import (
  GatedCrossAttentionBlock,
  PerceiverResampler,
  expand_media_mask,
  media_attention_mask,
  media_index,
)

TOL = 1e-4
IMG, EOD = 60, 2
SIZE, PATCH = 16, 8
LM = dict(vocab_size=64, width=32, depth=3, num_heads=4, num_kv_heads=2, mlp_dim=64)
VIT = dict(width=24, depth=1, mlp_dim=48, num_heads=2, patch_size=PATCH)
RES = dict(num_latents=4, depth=2, num_heads=2, head_dim=8, max_frames=2)
XATTN = dict(num_heads=2, head_dim=8, mlp_dim=48)


def _tokens():
  """Two rows, two images each: row 0 has text before its first image; row 1 starts with one."""
  ids = np.array(
    [[5, 6, IMG, 7, 8, 9, IMG, 10, 11, 12, 21, 22, 23], [IMG, 13, 14, 15, 16, IMG, 17, 18, 19, 20, 24, 25, 26]],
    np.int32,
  )
  return jnp.asarray(ids)


def _key(seed=0):
  """An init key: the RBG generator compiles several times faster than threefry (test time)."""
  return jax.random.key(seed, impl="unsafe_rbg")


def _images(key=1, m=2):
  return jax.random.normal(jax.random.key(key), (2, m, SIZE, SIZE, 3))


@functools.cache
def _flamingo():
  """A tiny Flamingo (gated blocks before LM blocks 0 and 2), its fresh params and a jitted forward
  fwd(params, images, tokens, mask) -> (logits, stats) (one compilation shared by the tests)."""
  model = Flamingo(LM, VIT, RES, XATTN, cross_attention_every=2, image_token_id=IMG)
  params = jax.jit(lambda: nn.unbox(model.init(_key(), _images(), _tokens())["params"]))()
  fwd = jax.jit(
    lambda p, images, tokens, mask: model.apply({"params": p}, images, tokens, mask=mask, return_stats=True)
  )
  return model, params, fwd


def _open_gates(params, value=1.0):
  """Every tanh gate set to `value` (fresh init: 0, the identity)."""
  flat = traverse_util.flatten_dict(params)
  flat = {k: (jnp.full_like(v, value) if k[-1].startswith("alpha_") else v) for k, v in flat.items()}
  return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------- (3) media masks


def test_media_attention_mask_on_known_sequences():
  M, E = IMG, EOD
  tokens = jnp.array([[1, 3, M, 4, 5, M, 6, M], [M, 3, 4, E, 5, M, E, 6], [3, 4, 5, 6, 7, 8, 9, 3]])
  np.testing.assert_array_equal(
    media_index(tokens, M), [[-1, -1, 0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 1, 1, 1], [-1] * 8]
  )
  # After an end-of-document token nothing is attended until the next image (the EOD keeps its own).
  np.testing.assert_array_equal(media_index(tokens, M, eod_token_id=E)[1], [0, 0, 0, 0, -1, 1, 1, -1])
  mask = np.asarray(media_attention_mask(tokens, M, 2))
  assert mask.shape == (3, 8, 2) and mask.dtype == bool
  np.testing.assert_array_equal(
    mask[0].astype(int), [[0, 0], [0, 0], [1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 0]]
  )  # a third image that was not given: nothing
  assert not mask[2].any()
  assert (mask.sum(-1) <= 1).all()
  prev = np.asarray(media_attention_mask(tokens, M, 3, all_previous=True))
  np.testing.assert_array_equal(prev[0].astype(int)[[0, 2, 5, 7]], [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
  kv = np.asarray(expand_media_mask(jnp.asarray(mask), 3))
  assert kv.shape == (3, 1, 8, 6)
  np.testing.assert_array_equal(kv[0, 0, 5], [0, 0, 0, 1, 1, 1])
  with pytest.raises(ValueError, match="num_media"):
    media_attention_mask(tokens, M, 0)


# ----------------------------------------------------------------------------- (4) resampler


def test_resampler_shapes_time_embeddings_and_masked_media():
  r = PerceiverResampler(num_latents=5, depth=2, num_heads=2, head_dim=8, max_frames=3)
  x = jax.random.normal(jax.random.key(0), (2, 3, 7, 16))  # [B, T frames, N, D]
  params = jax.jit(lambda: nn.unbox(r.init(_key(1), x)["params"]))()
  assert params["latents"].shape == (5, 16) and params["time_embed"].shape == (3, 16)
  apply = jax.jit(
    lambda p, x, mask=None, max_frames=3: r.clone(max_frames=max_frames).apply({"params": p}, x, mask),
    static_argnames="max_frames",
  )
  out = apply(params, x)
  assert out.shape == (2, 5, 16)
  assert apply(params, x[:, 0]).shape == (2, 5, 16)  # a single frame [B, N, D]
  # Time embeddings make frame order matter; without them the resampler is permutation invariant.
  swapped = x[:, ::-1]
  assert np.abs(np.asarray(apply(params, swapped) - out)).max() > 1e-3
  no_time = {k: v for k, v in params.items() if k != "time_embed"}
  np.testing.assert_allclose(apply(no_time, swapped, max_frames=None), apply(no_time, x, max_frames=None), atol=1e-5)
  # Changing the media changes the output; masked-out features do not.
  other = x + jax.random.normal(jax.random.key(5), x.shape)  # (a shift alone would be LayerNormed away)
  assert np.abs(np.asarray(apply(params, other) - out)).max() > 1e-3
  mask = jnp.ones((2, 3, 7), bool).at[:, :, 5:].set(False)
  np.testing.assert_allclose(apply(params, x.at[:, :, 5:].set(100.0), mask), apply(params, x, mask), atol=1e-5)
  with pytest.raises(ValueError, match="max_frames"):
    r.apply({"params": params}, jnp.zeros((1, 4, 7, 16)))


def test_resampler_keys_values_are_media_and_latents():
  """One layer against a direct computation with K/V from [LN(media); LN(latents)] (Flamingo appendix A.1.1):
  and K/V from the media alone gives something else."""
  d, heads, hd, n_lat = 16, 2, 8, 3
  r = PerceiverResampler(num_latents=n_lat, depth=1, num_heads=heads, head_dim=hd)  # squared-ReLU FFW
  x = jax.random.normal(jax.random.key(0), (2, 6, d))
  p = jax.jit(
    lambda: jax.tree.map(
      lambda a: a + 0.1 * jax.random.normal(jax.random.key(7), a.shape), nn.unbox(r.init(_key(1), x)["params"])
    )
  )()
  b = p["block_0"]

  def ln(v, q):
    mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
    return (v - mu) / jnp.sqrt(var + 1e-5) * q["scale"] + q["bias"]

  def reference(with_latents):
    lat = jnp.broadcast_to(p["latents"], (2, n_lat, d))
    y = ln(lat, b["norm_latents"])
    kv = jnp.concatenate([ln(x, b["norm_media"]), y], 1) if with_latents else ln(x, b["norm_media"])
    a = b["attn"]
    q = jnp.einsum("bld,dhk->blhk", y, a["query"]["kernel"])
    k = jnp.einsum("bsd,dhk->bshk", kv, a["key"]["kernel"])
    v = jnp.einsum("bsd,dhk->bshk", kv, a["value"]["kernel"])
    w = jax.nn.softmax(jnp.einsum("blhk,bshk->bhls", q, k) / np.sqrt(hd), -1)
    lat = lat + jnp.einsum("bhls,bshk,hkd->bld", w, v, a["out"]["kernel"])
    h = jnp.square(jax.nn.relu(ln(lat, b["norm_mlp"]) @ b["mlp"]["fc1"]["kernel"]))
    lat = lat + h @ b["mlp"]["fc2"]["kernel"]
    return ln(lat, p["norm"])

  ours = jax.jit(r.apply)({"params": p}, x)
  np.testing.assert_allclose(ours, jax.jit(reference, static_argnums=0)(True), atol=1e-5)
  assert np.abs(np.asarray(ours - jax.jit(reference, static_argnums=0)(False))).max() > 1e-3


# ----------------------------------------------------------------------------- (2) gates at 0


def test_fresh_flamingo_is_exactly_the_lm():
  model, params, fwd = _flamingo()
  assert sorted(k for k in params if k.startswith("xattn")) == ["xattn_0", "xattn_1"]  # before LM blocks 0, 2
  lm = DecoderLM(**LM)
  lm_shapes = jax.eval_shape(lambda: nn.unbox(lm.init(jax.random.key(0), _tokens())["params"]))
  assert jax.tree.map(lambda a: a.shape, lm_shapes) == jax.tree.map(lambda a: a.shape, params["lm"])
  tokens = _tokens()
  mask = jnp.ones(tokens.shape, bool).at[0, :2].set(False)  # a left-padded row
  theirs = jax.jit(lambda p, t, m: lm.apply({"params": p}, t, mask=m))(params["lm"], tokens, mask)
  np.testing.assert_allclose(fwd(params, _images(), tokens, mask)[0], theirs, rtol=0, atol=1e-6)
  # With open gates the images matter, and only from the first placeholder on.
  opened = _open_gates(params)
  ones = jnp.ones(tokens.shape, bool)
  logits, stats = fwd(opened, _images(1), tokens, ones)
  diff = np.abs(np.asarray(logits - fwd(opened, _images(2), tokens, ones)[0])).max(-1)
  assert (diff[0, :2] == 0).all() and (diff[0, 2:] > 1e-4).all() and (diff[1] > 1e-4).all()
  assert logits.shape == (2, 13, LM["vocab_size"]) and logits.dtype == jnp.float32
  assert float(stats["image_token_mismatch"]) == 0.0  # two placeholders, two images per row


def test_gated_block_is_identity_at_init_and_zero_before_any_image():
  blk = GatedCrossAttentionBlock(num_heads=2, head_dim=8, mlp_dim=32, alpha_shape="vector")
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  media = jax.random.normal(jax.random.key(1), (2, 6, 12))
  mask = expand_media_mask(media_attention_mask(jnp.array([[1, IMG, 1, IMG, 1], [1, 1, 1, 1, 1]]), IMG, 2), 3)
  params = nn.unbox(jax.jit(blk.init)(_key(2), x, media, mask)["params"])
  assert params["alpha_attn"].shape == (16,) and not params["alpha_attn"].any()
  np.testing.assert_array_equal(blk.apply({"params": params}, x, media, mask), x)
  no_ffw = dict(params, alpha_attn=jnp.ones(16))
  y = np.asarray(blk.apply({"params": no_ffw}, x, media, mask) - x)
  assert (y[0, 0] == 0).all() and (y[1] == 0).all() and (np.abs(y[0, 1:]) > 0).all()
  with pytest.raises(ValueError, match="alpha_shape"):
    GatedCrossAttentionBlock(alpha_shape="matrix").init(jax.random.key(0), x, media)


# ----------------------------------------------------------------------------- (5) cached decoding


def test_cached_generation_equals_uncached_greedy():
  model, params, fwd = _flamingo()
  params = _open_gates(params, 0.8)
  tokens, images = _tokens(), _images()
  p, new = 7, 6
  mask = jnp.ones(tokens.shape, bool).at[1, :1].set(False)  # row 1 left-padded by one token
  out = jax.jit(functools.partial(predict_fns(model)["generate"], max_new_tokens=new, eos_id=-1))(
    params, images, tokens[:, :p], mask=mask[:, :p]
  )
  # Uncached: the full forward over a fixed-size buffer (causal: later slots do not change earlier logits).
  seq = tokens
  for i in range(p, p + new):
    nxt = jnp.argmax(fwd(params, images, seq, mask)[0][:, i - 1], axis=-1).astype(jnp.int32)
    seq = seq.at[:, i].set(nxt)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(seq[:, p:]))


@pytest.mark.slow
def test_teacher_forced_steps_match_the_full_forward():
  """Token-by-token cached logits == the uncached logits, incl. an image placeholder fed after the
  first token (the cached token history moves later tokens to the next image), and without images."""
  model, params, fwd = _flamingo()
  params = _open_gates(params, 0.8)
  tokens, images = _tokens(), _images()
  ones = jnp.ones(tokens.shape, bool)
  step = jax.jit(step_fn(model, params))
  for imgs in (images, None):
    full = fwd(params, imgs, tokens, ones)[0]
    cache = jax.jit(lambda p, x, t: init_cache(model, p, t, tokens.shape[1], images=x))(params, imgs, tokens[:, :1])
    steps = []
    for i in range(tokens.shape[1]):
      logits, cache = step(cache, tokens[:, i : i + 1], jnp.int32(i))
      steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5)


# ----------------------------------------------------------------------------- (1) parity with HF IDEFICS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import copy  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402

from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer  # noqa: E402
from transformers.models.idefics.perceiver import IdeficsPerceiverResampler  # noqa: E402

from conftest import rewrite_checkpoint, save_hub_style  # noqa: E402
from vlm.convert.hf_config import ConfigError  # noqa: E402
from vlm.convert.idefics import (  # noqa: E402
  import_hf_idefics,
  import_hf_idefics_gated_xattn,  # noqa: E402
  import_hf_idefics_perceiver,
)


def _hf_config(alpha_type="float", qk=True, depth=2, every=1, extra_vocab=0, vision=None, **text):
  """A tiny IdeficsConfig; vision: more vision_config keys, text: more (top-level) LM keys."""
  cfg = transformers.IdeficsConfig(
    vocab_size=64,
    additional_vocab_size=extra_vocab,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=depth,
    num_attention_heads=4,
    cross_layer_interval=every,
    use_resampler=True,
    alpha_initializer="zeros",
    alpha_type=alpha_type,
    qk_layer_norms=qk,  # 'normal' + 'float' fails in HF
    vision_config=dict(
      embed_dim=24,
      image_size=SIZE,
      patch_size=PATCH,
      num_hidden_layers=1,
      num_attention_heads=2,
      intermediate_size=48,
      **(vision or {}),
    ),
    perceiver_config=dict(
      use_resampler=True,
      resampler_n_latents=4,
      resampler_depth=2,
      resampler_n_heads=2,
      resampler_head_dim=8,
      qk_layer_norms_perceiver=qk,
    ),
    **text,
  )
  cfg._attn_implementation = "eager"
  return cfg


def _perturb(module, seed=0):
  """HF inits norms to 1, biases / alphas to 0: perturb every tensor, alphas to random non-zero gates."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      p.add_(torch.randn_like(p) if "alpha" in name else 0.1 * torch.randn_like(p))
  return module.eval()


def _hf_image_mask(tokens, num_media, tokens_per_media):
  """Our media mask as IDEFICS's [B, 1, T, M * R] additive mask and [B, T] cross_attention_gate."""
  m = np.asarray(expand_media_mask(media_attention_mask(jnp.asarray(tokens), IMG, num_media), tokens_per_media))
  additive = np.where(m, 0.0, np.finfo(np.float32).min).astype(np.float32)
  return torch.tensor(additive), torch.tensor(m.any(-1)[:, 0].astype(np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("qk", [True, False])
def test_perceiver_resampler_matches_hf(qk):
  cfg = _hf_config(qk=qk)
  torch.manual_seed(0)
  hf = _perturb(IdeficsPerceiverResampler(cfg, 24, 2, 2, 8, 4))
  kw, params = import_hf_idefics_perceiver(hf.state_dict(), cfg)
  assert kw["mlp_act"] == "relu" and kw["qk_norm"] == ("layer" if qk else None)
  ours_model = PerceiverResampler(**kw)
  x = np.random.default_rng(0).normal(size=(3, 5, 24)).astype(np.float32)
  init = jax.eval_shape(lambda: nn.unbox(ours_model.init(jax.random.key(0), jnp.asarray(x))["params"]))
  assert jax.tree.map(lambda a: a.shape, init) == jax.tree.map(lambda a: a.shape, params)
  with torch.no_grad():
    theirs = hf(torch.tensor(x)).numpy()
  ours = np.asarray(ours_model.apply({"params": params}, jnp.asarray(x)))
  diff = float(np.abs(ours - theirs).max())
  print(f"IDEFICS perceiver resampler (qk_norm={qk}) max abs diff: {diff:.2e}")
  assert ours.shape == theirs.shape == (3, 4, 24) and diff <= TOL


@pytest.mark.parametrize("alpha_type,qk", [("float", True), ("vector", False)])
def test_gated_cross_attention_matches_hf(alpha_type, qk):
  cfg = _hf_config(alpha_type, qk)
  torch.manual_seed(0)
  hf = _perturb(IdeficsGatedCrossAttentionLayer(cfg, layer_idx=0))
  # A whole-model state dict works too (prefix 'model.gated_cross_attn_layers.{j}.').
  sd = {f"model.gated_cross_attn_layers.1.{k}": v for k, v in hf.state_dict().items()}
  kw, params = import_hf_idefics_gated_xattn(sd, cfg, index=1)
  assert kw["alpha_shape"] == ("scalar" if alpha_type == "float" else "vector") and kw["norm"] == "rms"
  assert np.abs(params["alpha_attn"]).min() > 0  # the gates are exercised
  rng = np.random.default_rng(0)
  tokens = _tokens()
  x = rng.normal(size=(2, tokens.shape[1], 32)).astype(np.float32)
  media = rng.normal(size=(2, 2 * 4, 24)).astype(np.float32)  # 2 images x 4 latents, vision width 24
  image_mask, gate = _hf_image_mask(tokens, 2, 4)
  with torch.no_grad():
    theirs = hf(
      torch.tensor(x),
      image_hidden_states=torch.tensor(media),
      image_attention_mask=image_mask,
      cross_attention_gate=gate,
    ).numpy()
  block = GatedCrossAttentionBlock(**kw)
  kv_mask = expand_media_mask(media_attention_mask(tokens, IMG, 2), 4)
  ours = np.asarray(block.apply({"params": params}, jnp.asarray(x), jnp.asarray(media), kv_mask))
  diff = float(np.abs(ours - theirs).max())
  print(f"IDEFICS gated cross-attention ({alpha_type}, qk_norm={qk}) max abs diff: {diff:.2e}")
  assert diff <= TOL
  assert np.abs(theirs - x)[0, :2].max() > 0  # the FFW gate acts on tokens before any image too


def _idefics_logits(hf, kw, params, extra_vocab=0):
  """(ours, HF's) logits of IdeficsForVisionText2Text and the Flamingo built from kw on two rows with two
  images each (an additional-vocabulary token in row 1 when extra_vocab)."""
  model = Flamingo(**kw)
  rng = np.random.default_rng(0)
  tokens = np.asarray(_tokens()).copy()
  if extra_vocab:
    tokens[1, 3] = 64 + extra_vocab - 1  # an additional-vocabulary token
  pixels = rng.normal(size=(2, 2, 3, SIZE, SIZE)).astype(np.float32)  # [B, M, C, H, W]
  m = np.asarray(media_attention_mask(jnp.asarray(tokens), IMG, 2)).astype(np.int64)
  with torch.no_grad():
    theirs = hf(
      input_ids=torch.tensor(tokens), pixel_values=torch.tensor(pixels), image_attention_mask=torch.tensor(m)
    ).logits.numpy()
  ours = np.asarray(
    jax.jit(model.apply)({"params": params}, jnp.asarray(pixels.transpose(0, 1, 3, 4, 2)), jnp.asarray(tokens))
  )
  return ours, theirs, model, tokens


def test_idefics_model_logits_match_hf():
  """IdeficsForVisionText2Text (gated blocks before LM layers 0 and 2, 2 extra vocabulary rows) vs Flamingo."""
  cfg = _hf_config("vector", True, depth=4, every=2, extra_vocab=2)
  torch.manual_seed(0)
  hf = _perturb(transformers.IdeficsForVisionText2Text(cfg), seed=1)
  name, kw, params = import_hf_idefics(hf.state_dict(), cfg, image_token_id=IMG)
  assert name == "flamingo" and kw["cross_attention_every"] == 2 and kw["lm_config"]["vocab_size"] == 66
  ours, theirs, model, tokens = _idefics_logits(hf, kw, params, extra_vocab=2)
  assert tokens[1, 3] == 65
  diff = float(np.abs(ours - theirs).max())
  print(f"IDEFICS model logits max abs diff: {diff:.2e}")
  assert ours.shape == theirs.shape and diff <= TOL
  init = jax.eval_shape(
    lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 2, SIZE, SIZE, 3)), jnp.asarray(tokens[:1]))["params"])
  )
  assert set(traverse_util.flatten_dict(init)) == set(traverse_util.flatten_dict(params))
  with pytest.raises(ValueError, match="not used"):
    import_hf_idefics(dict(hf.state_dict(), extra=torch.zeros(1)), cfg)


# Non-default values (in the Hub-style file); transformers' defaults 1e-5, 1e-6, 10000.
VISION_EPS, RMS_EPS, THETA = 0.1, 1e-2, 100.0


@functools.cache
def _hub_idefics(root):
  """A tiny IDEFICS saved the way transformers 4.x writes the Hub's checkpoints (conftest.save_hub_style), with a
  non-default vision eps, RMSNorm eps and rope theta: (transformers' model loaded from it, directory)."""
  cfg = _hf_config(
    "vector",
    True,
    depth=2,
    every=1,
    vision=dict(layer_norm_eps=VISION_EPS),
    rms_norm_eps=RMS_EPS,
    rope_parameters=dict(rope_type="default", rope_theta=THETA),
  )
  torch.manual_seed(0)
  path = save_hub_style(_perturb(transformers.IdeficsForVisionText2Text(cfg), seed=1), f"{root}/idefics")
  return transformers.IdeficsForVisionText2Text.from_pretrained(path, attn_implementation="eager").eval(), path


@pytest.fixture(scope="module")
def hub_idefics(tmp_path_factory):
  return _hub_idefics(str(tmp_path_factory.mktemp("hf_idefics")))


def test_import_hf_reads_a_saved_idefics_directory(hub_idefics):
  """vlm.convert.import_hf (config.json + safetensors) routes IDEFICS to the Flamingo importer; a Hub-style file
  (defaults left out, rope_theta) gives the kwargs of the full config and transformers' logits."""
  from vlm.convert.hf import import_hf

  hf, path = hub_idefics
  written = json.load(open(f"{path}/config.json"))
  assert "hidden_act" not in written["vision_config"] and written["vision_config"]["layer_norm_eps"] == VISION_EPS
  assert "rope_parameters" not in written and written["rope_theta"] == THETA
  name, kw, params = import_hf(path)
  _, kw2, params2 = import_hf_idefics(hf.state_dict(), hf.config)
  assert name == "flamingo" and kw == kw2
  assert (kw["vision_config"]["norm_eps"], kw["vision_config"]["mlp_act"]) == (VISION_EPS, "gelu")
  assert (kw["lm_config"]["norm_eps"], kw["xattn_config"]["norm_eps"], kw["lm_config"]["rope_theta"]) == (
    RMS_EPS,
    RMS_EPS,
    THETA,
  )
  flat, flat2 = traverse_util.flatten_dict(params), traverse_util.flatten_dict(params2)
  assert set(flat) == set(flat2)
  for k in flat:
    np.testing.assert_array_equal(flat[k], flat2[k], err_msg="/".join(k))
  kw["image_token_id"] = IMG  # the tokenizer's, not in the config
  ours, theirs, _, _ = _idefics_logits(hf, kw, params)
  diff = float(np.abs(ours - theirs).max())
  print(f"IDEFICS Hub-style directory logits max abs diff: {diff:.2e}")
  assert diff <= TOL
  # Each non-default value replaced by transformers' default (an importer ignoring the key) shows.
  diffs = {}
  for what, keys, default in (
    ("vision layer_norm_eps", [("vision_config", "norm_eps")], 1e-5),
    ("rms_norm_eps", [("lm_config", "norm_eps"), ("xattn_config", "norm_eps")], 1e-6),
    ("rope_theta", [("lm_config", "rope_theta")], 10000.0),
  ):
    wrong = copy.deepcopy(kw)
    for a, b in keys:
      wrong[a][b] = default
    diffs[what] = float(np.abs(_idefics_logits(hf, wrong, params)[0] - theirs).max())
  print(f"IDEFICS logits max abs diff with a default instead of the file's value: {diffs}")
  assert all(d > 1e-3 for d in diffs.values()), diffs


@pytest.mark.parametrize(
  "sub,key,value",
  [
    (None, "alpha_type", "matrix"),
    (None, "hidden_act", "gelu"),
    (None, "use_resampler", False),
    (None, "rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("vision_config", "hidden_act", "relu6"),
    (None, "alpha_initializer", "uniform"),
  ],
)
def test_unsupported_idefics_value_names_file_key_and_value(hub_idefics, tmp_path, sub, key, value):
  from vlm.convert.hf import import_hf

  _, path = hub_idefics
  written = json.load(open(f"{path}/config.json"))
  change = {key: value} if sub is None else {sub: dict(written[sub], **{key: value})}
  dst = rewrite_checkpoint(path, tmp_path / "bad", config=change)
  name = key if sub is None else f"{sub}.{key}"
  message = rf"^{re.escape(dst)}/config.json: {re.escape(name)} = {re.escape(repr(value))}:"
  with pytest.raises(ConfigError, match=message):
    import_hf(dst)
