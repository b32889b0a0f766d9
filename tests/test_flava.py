"""FLAVA: the ViT mask token, shapes, tokenizer grid, the six loss terms and their masking, ITM
negatives, which states each head reads (MMM the fused ones), the MIM targets (the frozen tokenizer's
codes), ITM negatives from the global batch through the objective, a frozen tokenizer through the
trainer, and every term learning on the tiny scenes."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import shared_run
from helpers import TINY_TOWER, shrink, shuffled
from vlm import checkpoint
from vlm.data.pipeline import make_pipeline
from vlm.losses import hard_negative_indices
from vlm.metrics_writer import read_metrics
from vlm.models import FLAVA, ViT, VQTokenizer
from vlm.models.flava import MaskedViT
from vlm.objectives.flava import FlavaObjective
from vlm.train import train

PAD, EOS, BOS = 0, 1, 3
L, V = 8, 41  # text length; vocabulary incl. the [MASK] row (id 40)
TOK = dict(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=8, codebook_size=24, code_dim=8)
WEIGHTS = ("contrastive", "mlm", "mim", "mmm_text", "mmm_image", "itm")


def tiny_flava(**over) -> FLAVA:
  kw = dict(
    image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8),
    text=dict(vocab_size=V, width=32, depth=1, mlp_dim=64, num_heads=2, max_len=L),
    multimodal=dict(width=48, depth=1, mlp_dim=64, num_heads=2),
    tokenizer=TOK,
    embed_dim=16,
  )
  kw.update(over)
  return FLAVA(**kw)


def make_batch(b: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  text = np.zeros((b, L), np.int32)
  for i in range(b):
    n = rng.integers(2, L - 1)  # words; BOS + words + EOS <= L
    text[i, 0], text[i, 1 : n + 1], text[i, n + 1] = BOS, rng.integers(4, V - 1, n), EOS
  images = rng.uniform(-1, 1, (b, 32, 32, 3)).astype(np.float32)
  return {"image": jnp.asarray(images), "text": jnp.asarray(text)}


def init_params(model, batch):
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), batch["image"][:1], batch["text"][:1])["params"])


def run(obj, model, params, batch, seed=0, train=False):
  """(loss, metrics) of the objective, jitted (much faster than eager dispatch)."""
  return jax.jit(lambda p, b, k: obj(model, p, b, rng=k, train=train))(params, batch, jax.random.key(seed))


@pytest.fixture(scope="module")
def flava():
  model = tiny_flava()
  batch = make_batch(16)
  return model, init_params(model, batch), batch


# --- the image encoder's mask token -----------------------------------------------------------


def vit(masked: bool = False, **over):
  kw = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=8, class_token=True, pool_type="cls")
  kw.update(over)
  return (MaskedViT if masked else ViT)(**kw)


def test_masked_vit_without_a_mask_is_the_plain_vit():
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  plain = nn.meta.unbox(vit().init(jax.random.key(1), images)["params"])
  assert "mask_token" not in plain
  with pytest.raises(ValueError, match="no mask token.*MaskedViT"):
    vit().apply({"params": plain}, images, patch_mask=jnp.zeros((2, 4), bool))
  # The same parameters (plus the token) give the same outputs when no patch is masked.
  masked = nn.meta.unbox(vit(masked=True).init(jax.random.key(1), images)["params"])
  assert set(masked) == set(plain) | {"mask_token"}
  out = vit().apply({"params": plain}, images)[0]
  out2 = vit(masked=True).apply(
    {"params": dict(plain, mask_token=masked["mask_token"])}, images, patch_mask=jnp.zeros((2, 4), bool)
  )[0]
  np.testing.assert_allclose(out2, out, atol=1e-6)


def test_masked_patches_are_replaced_by_the_mask_token():
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  mask = jnp.array([[True, False, False, True], [False, True, False, False]])
  model = vit(masked=True)
  params = nn.meta.unbox(model.init(jax.random.key(1), images)["params"])
  enc = lambda p, x: model.apply({"params": p}, x, patch_mask=mask)[1]["encoded"]
  ref = enc(params, images)
  # The pixels of a masked patch (row 0, patch 0 = top-left 8x8) never reach the encoder...
  np.testing.assert_allclose(enc(params, images.at[0, :8, :8].add(3.0)), ref, atol=1e-5)
  # ...those of an unmasked one do.
  assert np.abs(enc(params, images.at[0, :8, 8:].add(3.0)) - ref).max() > 1e-3
  # Without encoder layers, the outputs are LN(token + position) at masked patches, and an unmasked
  # patch's output does not depend on the mask token at all.
  shallow = vit(masked=True, depth=0)
  p0 = nn.meta.unbox(shallow.init(jax.random.key(1), images)["params"])
  enc0 = lambda p: shallow.apply({"params": p}, images, patch_mask=mask)[1]["encoded"]
  bump = jax.random.normal(jax.random.key(9), p0["mask_token"].shape)  # not a constant: LN ignores those
  p_other = dict(p0, mask_token=p0["mask_token"] + bump)
  a, b = enc0(p0), enc0(p_other)
  tokens_masked = np.concatenate([[False], np.asarray(mask[0])])  # the class token first
  np.testing.assert_allclose(a[0, ~tokens_masked], b[0, ~tokens_masked], atol=1e-6)
  assert np.abs(a[0, tokens_masked] - b[0, tokens_masked]).max(-1).min() > 1e-3
  pos = p0["pos_embedding"]["pos_embedding"][0]
  ln = lambda x: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  expect = ln(p0["mask_token"][0, 0] + pos[1]) * p0["encoder_norm"]["scale"] + p0["encoder_norm"]["bias"]
  np.testing.assert_allclose(a[0, 1], expect, atol=1e-4)
  # With encoder layers, unmasked outputs change with the mask token, through attention only.
  assert np.abs(enc(dict(params, mask_token=params["mask_token"] + bump), images)[0, 2] - ref[0, 2]).max() > 1e-4


# --- the model ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_shapes_and_parameters(flava):
  model, params, batch = flava
  b = batch["text"].shape[0]
  zimg, ztxt, out = jax.jit(lambda p: model.apply({"params": p}, batch["image"], batch["text"]))(params)
  assert zimg.shape == ztxt.shape == (b, 16)
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=-1), 1.0, rtol=1e-5)
  assert out["mlm_logits"].shape == out["mmm_text_logits"].shape == (b, L, V)
  assert out["mim_logits"].shape == out["mmm_image_logits"].shape == (b, 16, TOK["codebook_size"])
  assert out["itm_logits"].shape == (b, 2) and out["codes"].shape == (b, 16) and out["codes"].dtype == jnp.int32
  assert {
    "tokenizer",
    "img",
    "txt",
    "mm",
    "mlm_head",
    "mim_head",
    "mmm_text_head",
    "mmm_image_head",
    "itm_head",
    "img_proj",
    "txt_proj",
    "t",
  } <= set(params)
  assert "mask_token" in params["img"] and "cls" in params["mm"]
  # Only the tokenizer's encoder side is part of FLAVA; its names are VQTokenizer's own.
  assert {"embedding", "encoder", "codebook"} == set(params["tokenizer"])
  # The TwoTower signatures of the zero-shot / retrieval evaluations.
  z, aux = model.apply({"params": params}, batch["image"], method=model.encode_image)
  np.testing.assert_allclose(z, zimg, atol=1e-5)
  assert aux["encoded"].shape == (b, 17, 32)
  z, aux = model.apply({"params": params}, batch["text"], train=False, method=model.encode_text)
  np.testing.assert_allclose(z, ztxt, atol=1e-5)


def test_text_padding_is_masked_and_bos_is_cls(flava):
  model, params, batch = flava
  z = model.apply({"params": params}, batch["text"], method=model.encode_text)[0]
  p2 = jax.tree.map(lambda x: x, params)
  p2["txt"]["embedding"]["embedding"] = params["txt"]["embedding"]["embedding"].at[PAD].add(5.0)
  np.testing.assert_allclose(model.apply({"params": p2}, batch["text"], method=model.encode_text)[0], z, atol=1e-5)
  # The last word moves [CLS_T] (bidirectional attention).
  t2 = batch["text"].at[:, 1].set(5)
  assert np.abs(model.apply({"params": params}, t2, method=model.encode_text)[0] - z).max() > 1e-4


@pytest.mark.slow
def test_tokenizer_grid_must_match_the_patch_grid(flava):
  _, _, batch = flava
  model = tiny_flava(tokenizer=dict(TOK, patch_size=4))
  with pytest.raises(ValueError, match=r"code grid \(8, 8\).*patch grid \(4, 4\)"):
    model.init(jax.random.key(0), batch["image"][:1], batch["text"][:1])


def test_mask_id_must_be_in_the_vocabulary(flava):
  model, params, batch = flava
  with pytest.raises(ValueError, match="mask_id=41"):
    FlavaObjective(mask_id=V)(model, params, batch, rng=jax.random.key(0), train=False)
  with pytest.raises(ValueError, match="tokenizer"):
    FlavaObjective(mask_id=V - 1)(tiny_flava(tokenizer=None), params, batch, rng=jax.random.key(0), train=False)


# --- the objective ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def terms(flava):
  """The default objective on a 64-pair batch, single device."""
  model, params, _ = flava
  batch = make_batch(64, seed=1)
  loss, m = run(FlavaObjective(mask_id=V - 1), model, params, batch, seed=3, train=True)
  return batch, loss, m


def test_loss_terms_finite_and_masking_rates(terms):
  batch, loss, m = terms
  assert np.isfinite(float(loss))
  for name in WEIGHTS:
    assert np.isfinite(float(m[f"{name}_loss"])) and float(m[f"{name}_loss"]) > 0, name
  np.testing.assert_allclose(loss, sum(m[f"{n}_loss"] for n in WEIGHTS), rtol=1e-5)  # every weight 1
  # MIM / MMM-image: exactly round(0.4 * 16) = 6 of the 16 patches of every image (blockwise).
  np.testing.assert_allclose(m["mim_masked_fraction"], 6 / 16, atol=1e-6)
  np.testing.assert_allclose(m["mmm_image_masked_fraction"], 6 / 16, atol=1e-6)
  # MLM: 15% of the non-special tokens (the metric's fraction is over all positions).
  eligible = float(np.mean(np.asarray(batch["text"]) > BOS))
  assert abs(float(m["mlm_masked_fraction"]) / eligible - 0.15) < 0.05, (m["mlm_masked_fraction"], eligible)
  # Chance-level predictions at initialisation.
  assert float(m["mlm_loss"]) == pytest.approx(np.log(V), rel=0.3)
  assert float(m["mim_loss"]) == pytest.approx(np.log(TOK["codebook_size"]), rel=0.3)
  assert float(m["itm_loss"]) == pytest.approx(np.log(2), rel=0.3)


def test_weights_are_fields_and_random_patch_masking(flava):
  model, params, batch = flava
  w = dict(
    contrastive_weight=0.5, mlm_weight=2.0, mim_weight=0.0, mmm_text_weight=1.5, mmm_image_weight=0.25, itm_weight=3.0
  )
  obj = FlavaObjective(mask_id=V - 1, mim_masking="random", mim_ratio=0.25, **w)
  loss, m = run(obj, model, params, batch)
  assert "mim_loss" not in m  # a zero weight drops its term
  np.testing.assert_allclose(loss, sum(w[f"{n}_weight"] * m[f"{n}_loss"] for n in WEIGHTS if n != "mim"), rtol=1e-5)
  np.testing.assert_allclose(m["mmm_image_masked_fraction"], 4 / 16, atol=1e-6)


def test_without_tokenizer_the_other_terms_train(flava):
  """Traced only (shapes, no compile): the model has no tokenizer or image heads; the other terms remain."""
  _, _, batch = flava
  bare = tiny_flava(tokenizer=None)
  p = jax.eval_shape(lambda: nn.meta.unbox(bare.init(jax.random.key(1), batch["image"][:1], batch["text"][:1])))[
    "params"
  ]
  assert "tokenizer" not in p and "mim_head" not in p and "mmm_image_head" not in p
  obj = FlavaObjective(mask_id=V - 1, mim_weight=0.0, mmm_image_weight=0.0)
  loss, m = jax.eval_shape(lambda q: obj(bare, q, batch, rng=jax.random.key(0), train=True), p)
  assert loss.shape == () and {"contrastive_loss", "mlm_loss", "mmm_text_loss", "itm_loss"} <= set(m)
  assert "mim_loss" not in m and "mmm_image_loss" not in m


@pytest.mark.slow
def test_sharded_objective_matches_single_device(flava, terms):
  """On 8 data devices the masks and every term but ITM (its negatives are drawn per device) match."""
  model, params, _ = flava
  batch, _, ref = terms
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("data"))), batch)
  obj = FlavaObjective(mask_id=V - 1, mesh=mesh)
  with jax.set_mesh(mesh):
    got = run(obj, model, params, sharded, seed=3, train=True)[1]
  for name in ("contrastive_loss", "mlm_loss", "mim_loss", "mmm_text_loss", "mmm_image_loss", "mlm_masked_fraction"):
    np.testing.assert_allclose(got[name], ref[name], rtol=2e-5, err_msg=name)
  assert np.isfinite(float(got["itm_loss"]))


@pytest.mark.parametrize("hard", [True, False])
def test_itm_negatives_are_never_the_positive(hard):
  """The objective's sampling (global batch over 8 devices, duplicate captions excluded)."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  b = 32
  text = make_batch(b, seed=2)["text"].at[1].set(make_batch(b, seed=2)["text"][0])  # rows 0, 1: same caption
  z = jax.random.normal(jax.random.key(0), (b, 8))
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  fn = jax.jit(lambda k: hard_negative_indices(put(z), put(z), k, scale=100.0, tokens=put(text), hard=hard, mesh=mesh))
  with jax.set_mesh(mesh):
    draws = [jax.device_get(fn(jax.random.key(i))) for i in range(20)]
  rows = np.arange(b)
  for neg_txt, neg_img in draws:
    assert (neg_txt != rows).all() and (neg_img != rows).all()
    assert neg_txt[0] != 1 and neg_txt[1] != 0 and neg_img[0] != 1 and neg_img[1] != 0
  # Every device draws from the whole global batch, not only its own rows.
  local = np.concatenate([d[0] // (b // 8) == rows // (b // 8) for d in draws])
  assert local.mean() < 0.9


# --- what each head reads, the MIM targets, the ITM negatives (through the objective) ------------


def perturbed(tree, seed: int, scale: float = 0.5):
  """tree + scale * N(0, 1) noise on every leaf."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def flava_equal(flava):
  """(model, params, batch, metrics) with a 32-wide multimodal encoder: every encoder as wide as the
  others, as in the demo (128) and FLAVA-base (768), so a head given another encoder's states runs
  instead of failing on shapes. metrics(params, batch): the default objective's metrics, jitted once
  with a fixed rng (the same masks and negatives each call), train=False (no dropout)."""
  _, _, batch = flava
  model = tiny_flava(multimodal=dict(width=32, depth=1, mlp_dim=64, num_heads=2))
  obj = FlavaObjective(mask_id=V - 1)
  return (
    model,
    init_params(model, batch),
    batch,
    jax.jit(lambda p, b: obj(model, p, b, rng=jax.random.key(3), train=False)[1]),
  )


@pytest.mark.slow
def test_mmm_reads_the_fused_states_and_mlm_mim_the_unimodal_ones(flava_equal):
  """Through the objective: another image moves MMM-text (the fused encoder attends to the image) and
  leaves MLM exactly as it was; another text moves MMM-image and leaves MIM; other multimodal-encoder
  parameters move MMM and ITM and none of the unimodal terms. A head fed the unimodal states where
  it should read h_M (or the reverse) fails one of these."""
  model, params, batch, eval_terms = flava_equal
  ref = eval_terms(params, batch)
  new_image = eval_terms(params, dict(batch, image=jnp.asarray(shuffled(batch["image"], seed=1))))
  new_text = eval_terms(params, dict(batch, text=jnp.asarray(shuffled(batch["text"], seed=1))))
  new_mm = eval_terms(dict(params, mm=perturbed(params["mm"], seed=2)), batch)
  moved = lambda got, name: abs(float(got[name]) - float(ref[name])) > 1e-3 * float(ref[name])
  for got, what, same, changed in [
    (new_image, "another image", ("mlm_loss", "mlm_accuracy"), ("mmm_text_loss",)),
    (new_text, "another text", ("mim_loss", "mim_accuracy"), ("mmm_image_loss",)),
    (
      new_mm,
      "other multimodal-encoder weights",
      ("contrastive_loss", "mlm_loss", "mim_loss"),
      ("mmm_text_loss", "mmm_image_loss", "itm_loss"),
    ),
  ]:
    for name in same:
      np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, err_msg=f"{what} moved {name}")
    for name in changed:
      assert moved(got, name), f"{what} left {name} at {float(ref[name]):.6f}: it does not read the fused states"

  # The model's own forward (init, conversion) wires its heads the same way: logits at every position.
  fwd = jax.jit(lambda p, img, txt: model.apply({"params": p}, img, txt)[2])
  image, text = batch["image"], batch["text"]
  out = fwd(params, image, text)
  out_img = fwd(params, jnp.asarray(shuffled(image, seed=1)), text)
  out_txt = fwd(params, image, jnp.asarray(shuffled(text, seed=1)))
  out_mm = fwd(dict(params, mm=perturbed(params["mm"], seed=2)), image, text)
  diff = lambda a, b, k: float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max())
  assert diff(out_img, out, "mlm_logits") == 0 and diff(out_img, out, "mmm_text_logits") > 1e-3
  assert diff(out_txt, out, "mim_logits") == 0 and diff(out_txt, out, "mmm_image_logits") > 1e-3
  assert diff(out_mm, out, "mlm_logits") == diff(out_mm, out, "mim_logits") == 0
  assert min(diff(out_mm, out, k) for k in ("mmm_text_logits", "mmm_image_logits", "itm_logits")) > 1e-3


class OracleFLAVA(FLAVA):
  """FLAVA whose MIM and MMM-image heads ignore their inputs and return the parameter 'oracle' [B, N, K]:
  with 30 on the logit of one code per patch, the objective's MIM accuracy is 1 exactly when its
  targets are those codes."""

  def mim_logits(self, h_img):
    return self.get_variable("params", "oracle")

  def mmm_image_logits(self, h_mm, num_patches):
    return self.get_variable("params", "oracle")


@pytest.mark.slow
def test_mim_targets_are_the_frozen_tokenizers_codes_of_the_unmasked_image(flava):
  """The targets of MIM and MMM-image are VQTokenizer.encode of the unmasked images (computed here with
  the tokenizer alone, on FLAVA's 'tokenizer' parameters) in the ViT's row-major patch order, so
  another tokenizer gives other targets; and no gradient reaches the tokenizer."""
  model, params, batch = flava
  vq = VQTokenizer(**TOK)
  encode = jax.jit(lambda p, x: vq.apply({"params": p}, x, method=vq.encode).reshape(x.shape[0], -1))
  codes = np.asarray(encode(params["tokenizer"], batch["image"]))
  assert len(np.unique(codes)) > 3  # a test of something: not one code everywhere
  np.testing.assert_array_equal(
    jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.image_codes))(params, batch["image"]), codes
  )
  other_tok = perturbed(params["tokenizer"], seed=4, scale=1.0)
  other_codes = np.asarray(encode(other_tok, batch["image"]))
  assert (other_codes != codes).mean() > 0.3

  oracle_model = OracleFLAVA(
    **{f.name: getattr(model, f.name) for f in dataclasses.fields(FLAVA) if f.init and f.name not in ("parent", "name")}
  )
  obj = FlavaObjective(mask_id=V - 1)
  metrics = jax.jit(lambda p: obj(oracle_model, p, batch, rng=jax.random.key(5), train=False)[1])

  def accuracy(oracle, p):
    got = metrics(dict(p, oracle=30.0 * jax.nn.one_hot(oracle, TOK["codebook_size"])))
    return float(got["mim_accuracy"]), float(got["mmm_image_accuracy"])

  assert accuracy(codes, params) == (1.0, 1.0)
  # The targets move with the tokenizer's parameters (they are that tokenizer's codes)...
  assert max(accuracy(codes, dict(params, tokenizer=other_tok))) < 0.8
  assert accuracy(other_codes, dict(params, tokenizer=other_tok)) == (1.0, 1.0)
  # ...and are each pair's own image's codes, not another example's.
  assert max(accuracy(np.asarray(shuffled(codes, seed=0)), params)) < 0.8

  # No gradient reaches the tokenizer (argmax codes, stop-gradient'ed): exactly zero, not merely small.
  # (test_frozen_tokenizer_loaded_and_unchanged_by_training: the trainer also keeps it frozen.)
  loss = lambda tok: obj(model, dict(params, tokenizer=tok), batch, rng=jax.random.key(3), train=True)[0]
  grads = jax.jit(jax.grad(loss))(params["tokenizer"])
  for path, g in traverse_util.flatten_dict(grads, sep="/").items():
    assert not np.asarray(g).any(), f"tokenizer/{path} got a gradient"


@pytest.mark.slow
@pytest.mark.parametrize("hard", [True, False])
def test_objective_draws_itm_negatives_from_the_whole_global_batch(flava, monkeypatch, hard):
  """On 8 devices (8 pairs each) the objective samples with the mesh over the global batch of 64 and fuses
  the drawn rows: the negatives a device uses come mostly from the other devices' examples (7/8 expected),
  are never the positive or a pair with the same caption, and are the indices take_rows gathers."""
  import vlm.objectives.flava as objective_module

  model, params, _ = flava
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  b = 64
  batch = make_batch(b, seed=6)
  batch["text"] = batch["text"].at[9].set(batch["text"][1])  # pairs 1 (device 0) and 9 (device 1): one caption
  calls, draws, gathered = [], [], []
  real_sample, real_take = objective_module.hard_negative_indices, objective_module.take_rows

  def sample(zimg, ztxt, rng, **kw):
    calls.append((zimg.shape[0], kw.get("mesh"), kw.get("hard", True)))
    neg = real_sample(zimg, ztxt, rng, **kw)
    jax.debug.callback(lambda t, i: draws.append((np.asarray(t), np.asarray(i))), *neg)
    gathered.append({id(x): name for x, name in zip(neg, ("text", "image"))})
    return neg

  def take(x, index, mesh=None):
    gathered.append((id(index), mesh))
    return real_take(x, index, mesh)

  monkeypatch.setattr(objective_module, "hard_negative_indices", sample)
  monkeypatch.setattr(objective_module, "take_rows", take)
  # ITM alone (the other terms' weights 0) keeps the program small; the sampling does not depend on them.
  obj = FlavaObjective(
    mask_id=V - 1,
    mesh=mesh,
    itm_hard_negatives=hard,
    contrastive_weight=0.0,
    mlm_weight=0.0,
    mim_weight=0.0,
    mmm_text_weight=0.0,
    mmm_image_weight=0.0,
  )
  sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("data"))), batch)
  fn = jax.jit(lambda p, bt, k: obj(model, p, bt, rng=k, train=True)[0])
  with jax.set_mesh(mesh):
    for i in range(8):
      jax.block_until_ready(fn(params, sharded, jax.random.key(i)))
  jax.effects_barrier()
  assert calls == [(b, mesh, hard)]  # traced once: the global batch, the objective's mesh
  ids, (txt_take, img_take) = gathered[0], gathered[1:]
  assert ids.get(txt_take[0]) == "text" and ids.get(img_take[0]) == "image", "take_rows got other indices"
  assert txt_take[1] is mesh and img_take[1] is mesh
  assert len(draws) == 8
  rows, device = np.arange(b), np.arange(b) // (b // 8)
  for neg_txt, neg_img in draws:
    assert neg_txt.shape == neg_img.shape == (b,)
    assert (neg_txt != rows).all() and (neg_img != rows).all()
    assert neg_txt[1] != 9 and neg_txt[9] != 1 and neg_img[1] != 9 and neg_img[9] != 1
  other_device = np.mean([device[d] != device for pair in draws for d in pair])
  assert other_device > 0.7, f"only {other_device:.0%} of the negatives come from another device"


# --- through the trainer ------------------------------------------------------------------------


def flava_config(data_dir, steps: int, tokenizer_dir=None, seed: int = 0):
  """The demo recipe on the tiny data (helpers.shrink: batch 32, a log line every step), with one-block
  32-wide image and text towers (helpers.TINY_TOWER), a two-block multimodal encoder, the tokenizer
  sizes TOK and the evaluations at the end on 256 test examples.

  Constant lr 3e-3 after 10 warmup steps and ITM weight 4, because ITM first sits at its prior (loss
  0.637, no positive called a match) until the multimodal encoder has a cross-modal feature. With the
  demo's one multimodal block and weight 1 it was still there after 100-120 steps (seed 0; lr 2e-3 to
  1e-2, cosine or constant); with two blocks, weight 1 and a constant lr, it left at step ~70 for seed
  0 but not within 120 steps for seed 1 (0.632, held-out match AUC 0.60). Cost: about 85 s of CPU."""
  from configs import flava_base

  c = shrink(flava_base.get_config("demo"), data_dir, steps, batch_size=32, warmup_steps=10)
  c.model["image"].update(TINY_TOWER)
  c.model["text"].update(TINY_TOWER)
  c.model["multimodal"].update(TINY_TOWER, depth=2)
  c.model["embed_dim"] = 32
  c.model["tokenizer"] = dict(TOK)
  c.init.path = str(tokenizer_dir) if tokenizer_dir else None
  c.lr, c.schedule.name, c.seed = 3e-3, "constant", seed
  c.objective.itm_weight = 4.0
  for name in ("zeroshot", "retrieval"):
    c.evals[name].every = 0
    c.evals[name].max_examples = 256
  return c


def save_random_tokenizer(wd) -> None:
  """A VQ workdir holding a randomly initialised tokenizer (its codes are valid, learnable MIM targets),
  saved as the trainer saves: `<wd>/checkpoints/<step>/state` with the parameters under 'params'."""
  model = VQTokenizer(**TOK)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(7), jnp.zeros((1, 32, 32, 3)))["params"])
  ckpt = checkpoint.Checkpointer(wd, save_every=1, async_save=False)
  ckpt.save(1, {"params": params, "step": jnp.ones((), jnp.int32)}, force=True)
  ckpt.close()


RUN_STEPS = 100


@pytest.fixture(scope="module")
def flava_run(tmp_path_factory, data_dir):
  """(workdir, final metrics, tokenizer workdir) of the RUN_STEPS-step flava_config run (seed 0), trained
  once per session (conftest.shared_run) from a random tokenizer saved beside it."""

  def make(root):
    save_random_tokenizer(root / "vq")
    return train(flava_config(data_dir, RUN_STEPS, tokenizer_dir=root / "vq"), root / "run")

  root, out = shared_run(tmp_path_factory, "flava", make)
  return root / "run", out, root / "vq"


def test_frozen_tokenizer_loaded_and_unchanged_by_training(flava_run):
  wd, _, vq_workdir = flava_run
  vq = traverse_util.flatten_dict(checkpoint.load_params(vq_workdir), sep="/")
  assert {"codebook", "decoder/encoder/block_0/attn/query/kernel"} <= set(vq)  # the whole VQ model
  trained = traverse_util.flatten_dict(checkpoint.load_params(wd), sep="/")
  tok = {k[len("tokenizer/") :]: v for k, v in trained.items() if k.startswith("tokenizer/")}
  assert tok and set(tok) <= set(vq)
  for k, v in tok.items():
    np.testing.assert_array_equal(v, vq[k], err_msg=k)


def test_every_term_is_logged_and_learning_happens(flava_run):
  """Zero-shot top-1 on seen combinations: chance 1.8%, measured 23.8 / 12.9 / 14.4% (seeds 0-2), threshold
  5 x chance = 8.9%; text-to-image R@5: measured 0.39 / 0.36 / 0.35, threshold 0.2."""
  wd, out, _ = flava_run
  rows = [r for r in read_metrics(wd) if "train/loss" in r]
  for name in WEIGHTS:
    assert f"train/{name}_loss" in rows[-1], name
  for key in ("train/mlm_accuracy", "train/mim_accuracy", "train/itm_accuracy", "train/scale"):
    assert key in rows[-1]
  assert rows[-1]["train/contrastive_loss"] < 0.7 * rows[0]["train/contrastive_loss"]
  assert rows[-1]["train/mlm_loss"] < rows[0]["train/mlm_loss"]
  assert out["zeroshot/top1_seen"] > 5 * out["zeroshot/chance"], out
  assert out["retrieval/t2i_r5"] > 0.2, out  # 5 of ~150 distinct captions: chance ~3%


# The learning test's baselines (nats), measured on the 1024 training pairs as the run sees them
# (caption_varied, 32 px, flip_lr; the tokenizer of save_random_tokenizer): the loss of the best guess
# that ignores the input.
MLM_UNIGRAM = 3.54  # the maskable tokens' unigram entropy (48 distinct pieces); log(1001) = 6.91
CODE_UNIGRAM = 1.19  # the codes' unigram entropy over all patches (18 of 24 codes used); log(24) = 3.18
ITM_PRIOR = 0.637  # H(1/3): one positive per two negatives; log(2) = 0.693


@pytest.mark.slow
def test_every_loss_falls_below_its_baseline(flava_run, data_dir):
  """Each term's training loss, averaged over the last 10 of the 100 steps, against its baseline (the
  first column) and a threshold; then ITM's match margin on the validation pairs ranks each true
  pair above mismatched ones (AUC; captions equal to the true one left out).

                 baseline                    seeds 0 / 1 / 2      threshold
    contrastive  log(32) = 3.47              1.43 / 1.45 / 1.37   2.2
    mlm          unigram 3.54 (log V 6.91)   2.60 / 2.48 / 2.70   3.1
    mmm_text     unigram 3.54                2.75 / 2.65 / 2.89   3.2
    mim          unigram 1.19 (log K 3.18)   0.97 / 0.96 / 0.91   1.08
    mmm_image    unigram 1.19                0.94 / 0.97 / 0.90   1.08
    itm          prior 0.637 (log 2 0.693)   0.58 / 0.60 / 0.54   0.62
    ITM AUC      0.5                         0.88 / 0.78 / 0.92   0.65

  (In 100 steps MIM gets down to about the codes' per-position entropy, 0.91: their frequencies, not
  yet much of their context.)"""
  wd, _, vq_workdir = flava_run
  rows = [r for r in read_metrics(wd) if "train/loss" in r][-10:]
  assert rows[-1]["step"] == RUN_STEPS
  failed = []
  for name, threshold, baseline in [
    ("contrastive", 2.2, np.log(32)),
    ("mlm", 3.1, MLM_UNIGRAM),
    ("mmm_text", 3.2, MLM_UNIGRAM),
    ("mim", 1.08, CODE_UNIGRAM),
    ("mmm_image", 1.08, CODE_UNIGRAM),
    ("itm", 0.62, ITM_PRIOR),
  ]:
    value = float(np.mean([r[f"train/{name}_loss"] for r in rows]))
    if not value <= threshold:
      failed.append(f"{name}_loss = {value:.3f} > {threshold} (baseline {baseline:.3f})")
  assert not failed, "did not learn: " + "; ".join(failed)

  c = flava_config(data_dir, RUN_STEPS, tokenizer_dir=vq_workdir)
  model, params = FLAVA(**c.model.to_dict()), checkpoint.load_params(wd)
  batch = next(
    iter(make_pipeline(c.data, split="validation", batch_size=64, mesh=None, seed=0, num_epochs=1, shuffle=False))
  )
  image, text = jnp.asarray(batch["image"]), jnp.asarray(batch["text"])
  other = np.roll(np.arange(len(text)), 7)
  margin = jax.jit(lambda p, t: jnp.diff(model.apply({"params": p}, image, t)[2]["itm_logits"], axis=-1)[:, 0])
  pos, neg = np.asarray(margin(params, text)), np.asarray(margin(params, text[other]))
  neg = neg[~np.all(np.asarray(text) == np.asarray(text)[other], axis=1)]
  auc = float((pos[:, None] > neg[None, :]).mean())
  assert auc >= 0.65, f"ITM's held-out match AUC = {auc:.3f} < 0.65 (chance 0.5): ITM did not learn"


def test_missing_tokenizer_checkpoint_says_how_to_make_it(data_dir, tmp_path):
  c = flava_config(data_dir, steps=1, tokenizer_dir=tmp_path / "nothing_here")
  with pytest.raises(FileNotFoundError, match=r"nothing_here.*configs/vq_tokenizer.py:demo"):
    train(c, tmp_path / "wd")
